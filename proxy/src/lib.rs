//! The Sluice proxy service on Pingora.
