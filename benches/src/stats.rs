//! Summary statistics as NumPy computes them (`np.percentile` with linear interpolation).

/// The `p`-th percentile (0..=100) of `sorted` (ascending), interpolating
/// linearly between closest ranks; `None` for an empty slice.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// The `P` percentiles `ps` (each 0..=100, ascending for speed but any order
/// is correct) of `v`, bit-for-bit what [`percentile_sorted`] gives on a
/// [`sorted`] copy, found by selection instead of a full sort: O(n) rather
/// than O(n log n), which matters for the hundreds of thousands of
/// inter-token gaps a long run produces. `v` is left reordered. `None` for an
/// empty slice.
pub fn percentiles_select<const P: usize>(v: &mut [f64], ps: [f64; P]) -> Option<[f64; P]> {
    if v.is_empty() {
        return None;
    }
    v.iter_mut()
        .for_each(|x| *x = f64::from_bits(order_key(*x)));
    let out = select_keyed(v, ps);
    v.iter_mut().for_each(|x| *x = from_order_key(x.to_bits()));
    Some(out)
}

/// The mean, the population standard deviation and the percentiles `ps` of
/// `v` at once, each bit-for-bit what [`mean`], [`std_dev`] and
/// [`percentiles_select`] give, in fewer passes over `v` — which is left
/// holding unspecified values. `None` for an empty slice.
pub fn describe<const P: usize>(v: &mut [f64], ps: [f64; P]) -> Option<(f64, f64, [f64; P])> {
    let m = mean(v)?;
    // `std_dev`'s arithmetic, and each value turned into its order key on the way.
    let sq = v
        .iter_mut()
        .map(|x| {
            let d = (*x - m).powi(2);
            *x = f64::from_bits(order_key(*x));
            d
        })
        .sum::<f64>();
    let sd = (sq / v.len() as f64).sqrt();
    Some((m, sd, select_keyed(v, ps)))
}

/// [`percentiles_select`] over values already replaced by their order keys
/// (as bit patterns): the selection compares integers.
fn select_keyed<const P: usize>(v: &mut [f64], ps: [f64; P]) -> [f64; P] {
    let by_key = |a: &f64, b: &f64| a.to_bits().cmp(&b.to_bits());
    let last = (v.len() - 1) as f64;
    let mut out = [0.0; P];
    // Everything before `done` is ≤ everything from it on, so a higher
    // percentile only searches the tail.
    let mut done = 0;
    for (slot, &p) in out.iter_mut().zip(&ps) {
        // The same rank arithmetic as `percentile_sorted`.
        let rank = (p.clamp(0.0, 100.0) / 100.0) * last;
        let lo = rank.floor() as usize;
        let hi = rank.ceil() as usize;
        let frac = rank - lo as f64;
        let from = if lo >= done { done } else { 0 };
        let (_, &mut a, right) = v[from..].select_nth_unstable_by(lo - from, by_key);
        // The next order statistic is the smallest of what lies above `lo`.
        let b = if hi > lo {
            right
                .iter()
                .map(|x| x.to_bits())
                .min()
                .unwrap_or(a.to_bits())
        } else {
            a.to_bits()
        };
        let (a, b) = (from_order_key(a.to_bits()), from_order_key(b));
        *slot = a + (b - a) * frac;
        done = lo;
    }
    out
}

/// An `f64`'s bits remapped so that unsigned integer order is `f64::total_cmp` order.
fn order_key(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 { !b } else { b | 1 << 63 }
}

/// The inverse of [`order_key`].
fn from_order_key(k: u64) -> f64 {
    f64::from_bits(if k >> 63 == 1 { k & !(1 << 63) } else { !k })
}

/// Arithmetic mean; `None` for an empty slice.
pub fn mean(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        None
    } else {
        Some(v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// Population standard deviation (NumPy's default `ddof=0`); `None` for an empty slice.
pub fn std_dev(v: &[f64]) -> Option<f64> {
    let m = mean(v)?;
    Some((v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt())
}

/// Sorts a copy ascending (NaNs last).
pub fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_numpy_linear_percentiles() {
        // np.percentile([1, 2, 3, 4], [50, 90, 99]) == [2.5, 3.7, 3.97]
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile_sorted(&v, 50.0), Some(2.5));
        assert!((percentile_sorted(&v, 90.0).unwrap() - 3.7).abs() < 1e-12);
        assert!((percentile_sorted(&v, 99.0).unwrap() - 3.97).abs() < 1e-12);
        assert_eq!(percentile_sorted(&[5.0], 99.0), Some(5.0));
        assert_eq!(percentile_sorted(&[], 50.0), None);
        assert_eq!(std_dev(&[1.0, 3.0]), Some(1.0));
        let mut w = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(
            percentiles_select(&mut w, [50.0, 90.0, 99.0]),
            Some([
                2.5,
                percentile_sorted(&v, 90.0).unwrap(),
                percentile_sorted(&v, 99.0).unwrap()
            ])
        );
        assert_eq!(percentiles_select(&mut [], [50.0]), None);
    }

    fn sorted_percentiles<const P: usize>(v: &[f64], ps: [f64; P]) -> Option<[f64; P]> {
        let s = sorted(v);
        let mut out = [0.0; P];
        for (o, p) in out.iter_mut().zip(ps) {
            *o = percentile_sorted(&s, p)?;
        }
        Some(out)
    }

    /// Values with many ties, signed zeros and infinities, as well as ordinary ones.
    fn value() -> impl Strategy<Value = f64> {
        prop_oneof![
            4 => -1e3f64..1e3,
            2 => (0u8..8).prop_map(f64::from),
            1 => prop::sample::select(vec![0.0, -0.0, f64::INFINITY, f64::NEG_INFINITY, 1e-300]),
        ]
    }

    proptest! {
        #[test]
        fn order_keys_sort_as_total_cmp(a in value(), b in value(), bits in any::<u64>()) {
            prop_assert_eq!(order_key(a).cmp(&order_key(b)), a.total_cmp(&b));
            let x = f64::from_bits(bits);
            prop_assert_eq!(from_order_key(order_key(x)).to_bits(), bits);
        }

        #[test]
        fn selection_equals_sorting_bit_for_bit(
            v in prop::collection::vec(value(), 0..400),
            ps in prop::collection::vec(0.0f64..=100.0, 1..6),
            ascending in any::<bool>(),
        ) {
            let mut ps = ps;
            if ascending {
                ps.sort_by(f64::total_cmp);
            }
            let mut q = [0.0; 5];
            for (q, p) in q.iter_mut().zip(ps.iter().cycle()) {
                *q = *p;
            }
            let want = sorted_percentiles(&v, q);
            let mut w = v.clone();
            let got = percentiles_select(&mut w, q);
            // `v` comes back reordered, not changed.
            let (mut a, mut b) = (v.clone(), w.clone());
            a.sort_by(f64::total_cmp);
            b.sort_by(f64::total_cmp);
            prop_assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            // `to_bits` tells -0.0 from 0.0 and compares NaNs (∞ − ∞) too.
            prop_assert_eq!(want.map(|a| a.map(f64::to_bits)), got.map(|a| a.map(f64::to_bits)));
            // All at once, as a latency summary computes them.
            let mut d = v.clone();
            let want_all = mean(&v).zip(std_dev(&v)).zip(sorted_percentiles(&v, q));
            let got_all = describe(&mut d, q).map(|(m, s, p)| ((m, s), p));
            prop_assert_eq!(
                want_all.map(|((m, s), p)| (m.to_bits(), s.to_bits(), p.map(f64::to_bits))),
                got_all.map(|((m, s), p)| (m.to_bits(), s.to_bits(), p.map(f64::to_bits)))
            );
            // The standard vLLM set, in the order the summary asks for it.
            let mut w = v.clone();
            prop_assert_eq!(
                sorted_percentiles(&v, [50.0, 90.0, 95.0, 99.0]).map(|a| a.map(f64::to_bits)),
                percentiles_select(&mut w, [50.0, 90.0, 95.0, 99.0]).map(|a| a.map(f64::to_bits))
            );
        }
    }
}
