//! The Kubernetes manifests in `deploy/k8s/`, checked without a cluster.
//!
//! Each overlay is rendered by a small kustomize of our own (resources,
//! configMapGenerator, namespace, labels, images, JSON 6902 patches: what
//! these kustomizations use), so the checks run on a machine without
//! kubectl; where kubectl is installed, its `kubectl kustomize` output must
//! equal ours. The rendered objects are then checked the way the API server
//! and the operators would see them: required fields, selectors that select,
//! probes and Service ports that name real container ports, the config that
//! `sluice check` accepts with the Secret's keys, the pool's DNS name that is
//! the headless Service, a grace period that covers preStop plus the drain,
//! the Prometheus rules identical to deploy/prometheus/rules.yaml, engine
//! arguments that really start a replica. Where `kubernetes-validate` is
//! installed (`./dev setup` installs it), every built-in object is also
//! validated against the Kubernetes OpenAPI schemas.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "deploy_common/mod.rs"]
mod deploy;
#[path = "sim_common/mod.rs"]
mod sim;

use std::path::{Path, PathBuf};
use std::process::Command;

use deploy::{check, repo, starts_with_args, toml_value, yaml};
use serde_yaml::{Mapping, Value};

/// Every YAML document in a file.
fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_yaml::with::singleton_map_recursive::deserialize(d)
                .unwrap_or_else(|e: serde_yaml::Error| panic!("{}: {e}", path.display()))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what}: not a list: {v:?}"))
}

fn map<'a>(v: &'a Value, what: &str) -> &'a Mapping {
    v.as_mapping()
        .unwrap_or_else(|| panic!("{what}: not a mapping: {v:?}"))
}

fn label_map(v: &Value) -> Mapping {
    v.as_mapping().cloned().unwrap_or_default()
}

/// Whether every pair of `selector` is in `labels`.
fn selects(selector: &Mapping, labels: &Mapping) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Objects that live in a namespace (everything these manifests use but Namespace).
fn namespaced(obj: &Value) -> bool {
    obj["kind"].as_str() != Some("Namespace")
}

/// Applies one JSON 6902 `replace`/`add` op at a JSON pointer.
fn apply_op(obj: &mut Value, op: &Value) {
    let kind = s(&op["op"], "patch op");
    let path = s(&op["path"], "patch path");
    assert!(matches!(kind, "replace" | "add"), "unsupported op {kind}");
    let parts: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect();
    let (last, parents) = parts.split_last().unwrap();
    let mut cur = obj;
    for p in parents {
        cur = match cur {
            Value::Sequence(v) => &mut v[p.parse::<usize>().unwrap()],
            Value::Mapping(m) => m
                .get_mut(p.as_str())
                .unwrap_or_else(|| panic!("patch path {path}: no {p}")),
            _ => panic!("patch path {path}: {p} is not a container"),
        };
    }
    match cur {
        Value::Mapping(m) => {
            assert!(
                kind == "add" || m.contains_key(last.as_str()),
                "replace of missing {path}"
            );
            m.insert(Value::from(last.as_str()), op["value"].clone());
        }
        Value::Sequence(v) => {
            let i: usize = last.parse().unwrap();
            v[i] = op["value"].clone();
        }
        _ => panic!("patch path {path}: not a container"),
    }
}

/// A kustomization directory rendered the way `kubectl kustomize` does for
/// the features these manifests use.
fn kustomize(dir: &Path) -> Vec<Value> {
    let k = {
        let path = dir.join("kustomization.yaml");
        let mut d = docs(&path);
        assert_eq!(d.len(), 1, "{}", path.display());
        d.remove(0)
    };
    assert_eq!(
        k["kind"].as_str(),
        Some("Kustomization"),
        "{}",
        dir.display()
    );
    let mut objs = Vec::new();
    for r in k["resources"].as_sequence().into_iter().flatten() {
        let p = dir.join(s(r, "resource"));
        assert!(
            p.exists(),
            "{} lists missing {}",
            dir.display(),
            p.display()
        );
        if p.is_dir() {
            objs.extend(kustomize(&p));
        } else {
            objs.extend(docs(&p));
        }
    }
    for g in k["configMapGenerator"].as_sequence().into_iter().flatten() {
        assert_eq!(
            g["options"]["disableNameSuffixHash"].as_bool(),
            Some(true),
            "the config ConfigMap keeps its name, so edits reach running pods"
        );
        let mut data = Mapping::new();
        for f in seq(&g["files"], "files") {
            let f = s(f, "file");
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            data.insert(Value::from(f), Value::from(text));
        }
        let mut meta = Mapping::new();
        meta.insert("name".into(), g["name"].clone());
        if let Some(l) = g["options"]["labels"].as_mapping() {
            meta.insert("labels".into(), Value::Mapping(l.clone()));
        }
        let mut cm = Mapping::new();
        cm.insert("apiVersion".into(), "v1".into());
        cm.insert("kind".into(), "ConfigMap".into());
        cm.insert("metadata".into(), Value::Mapping(meta));
        cm.insert("data".into(), Value::Mapping(data));
        objs.push(Value::Mapping(cm));
    }
    for l in k["labels"].as_sequence().into_iter().flatten() {
        assert!(
            l["includeSelectors"].as_bool() != Some(true),
            "selectors are immutable: keep added labels out of them"
        );
        for o in &mut objs {
            let meta = o["metadata"].as_mapping_mut().unwrap();
            let labels = meta
                .entry("labels".into())
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            for (lk, lv) in map(&l["pairs"], "label pairs") {
                labels
                    .as_mapping_mut()
                    .unwrap()
                    .insert(lk.clone(), lv.clone());
            }
        }
    }
    for img in k["images"].as_sequence().into_iter().flatten() {
        let name = s(&img["name"], "image name");
        let tag = s(&img["newTag"], "image newTag");
        for o in &mut objs {
            // get_mut, not IndexMut: indexing a missing key would insert it.
            let Some(cs) = o
                .get_mut("spec")
                .and_then(|v| v.get_mut("template"))
                .and_then(|v| v.get_mut("spec"))
                .and_then(|v| v.get_mut("containers"))
                .and_then(Value::as_sequence_mut)
            else {
                continue;
            };
            for c in cs {
                if c["image"].as_str() == Some(name) {
                    c["image"] = Value::from(format!("{name}:{tag}"));
                }
            }
        }
    }
    for p in k["patches"].as_sequence().into_iter().flatten() {
        let kind = s(&p["target"]["kind"], "patch target kind");
        let name = s(&p["target"]["name"], "patch target name");
        let ops: Vec<Value> = serde_yaml::from_str(s(&p["patch"], "patch")).unwrap();
        let target = objs
            .iter_mut()
            .find(|o| {
                o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name)
            })
            .unwrap_or_else(|| panic!("patch target {kind}/{name} not found"));
        for op in &ops {
            apply_op(target, op);
        }
    }
    if let Some(ns) = k["namespace"].as_str() {
        for o in &mut objs {
            let field = if namespaced(o) { "namespace" } else { "name" };
            o["metadata"]
                .as_mapping_mut()
                .unwrap()
                .insert(field.into(), ns.into());
        }
    }
    objs
}

fn key(o: &Value) -> (String, String) {
    (
        o["kind"].as_str().unwrap_or_default().to_string(),
        o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| key(o) == (kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

fn overlay(name: &str) -> (PathBuf, Vec<Value>) {
    let dir = repo(&format!("deploy/k8s/overlays/{name}"));
    let objs = kustomize(&dir);
    (dir, objs)
}

/// Whether a Kubernetes object name is a DNS-1123 label.
fn dns_label(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

/// The checks that hold for every overlay. Returns the proxy's config text.
fn check_common(objs: &[Value]) -> String {
    for o in objs {
        let (kind, name) = key(o);
        assert!(
            !kind.is_empty() && o["apiVersion"].as_str().is_some(),
            "{o:?}"
        );
        assert!(
            dns_label(&name),
            "{kind} name {name:?} is not a DNS-1123 label"
        );
        if namespaced(o) {
            assert_eq!(
                o["metadata"]["namespace"].as_str(),
                Some("sluice"),
                "{kind}/{name}"
            );
        }
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/part-of"].as_str(),
            Some("sluice"),
            "{kind}/{name}"
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for o in objs {
        assert!(seen.insert(key(o)), "duplicate {:?}", key(o));
    }

    // Workloads: selectors select their pods; probes, resources, images.
    let deployments: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"].as_str() == Some("Deployment"))
        .collect();
    for d in &deployments {
        let name = s(&d["metadata"]["name"], "name");
        assert_eq!(d["apiVersion"].as_str(), Some("apps/v1"));
        let sel = label_map(&d["spec"]["selector"]["matchLabels"]);
        let labels = label_map(&d["spec"]["template"]["metadata"]["labels"]);
        assert!(
            selects(&sel, &labels),
            "{name}: selector does not match its pods"
        );
        for c in seq(&d["spec"]["template"]["spec"]["containers"], "containers") {
            let image = s(&c["image"], "image");
            let last = image.rsplit('/').next().unwrap();
            assert!(last.contains(':'), "{name}: image {image} has no tag");
            assert!(
                !image.ends_with(":latest"),
                "{name}: pin the image, not :latest"
            );
            let req = &c["resources"]["requests"];
            assert!(
                req["cpu"].as_str().is_some() && req["memory"].as_str().is_some(),
                "{name}: requests"
            );
            assert!(
                c["resources"]["limits"]["memory"].as_str().is_some(),
                "{name}: memory limit"
            );
            let ports: Vec<&str> = c["ports"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|p| s(&p["name"], "port name"))
                .collect();
            for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                let p = &c[probe];
                if p.is_null() {
                    continue;
                }
                let port = if !p["httpGet"].is_null() {
                    &p["httpGet"]["port"]
                } else {
                    &p["tcpSocket"]["port"]
                };
                let port = s(port, "probe port");
                assert!(
                    ports.contains(&port),
                    "{name}: {probe} names no port {port}"
                );
            }
            assert!(!c["readinessProbe"].is_null(), "{name}: no readiness probe");
        }
    }

    // Services select pods and target their named ports.
    for svc in objs
        .iter()
        .filter(|o| o["kind"].as_str() == Some("Service"))
    {
        let name = s(&svc["metadata"]["name"], "name");
        let sel = label_map(&svc["spec"]["selector"]);
        let pods: Vec<&&Value> = deployments
            .iter()
            .filter(|d| {
                selects(
                    &sel,
                    &label_map(&d["spec"]["template"]["metadata"]["labels"]),
                )
            })
            .collect();
        assert_eq!(
            pods.len(),
            1,
            "Service {name} selects {} Deployments",
            pods.len()
        );
        let names: Vec<&str> = seq(&pods[0]["spec"]["template"]["spec"]["containers"], "c")
            .iter()
            .flat_map(|c| c["ports"].as_sequence().into_iter().flatten())
            .map(|p| s(&p["name"], "port name"))
            .collect();
        for p in seq(&svc["spec"]["ports"], "ports") {
            let t = s(&p["targetPort"], "targetPort");
            assert!(names.contains(&t), "Service {name}: no container port {t}");
        }
    }

    // The proxy.
    let proxy = find(objs, "Deployment", "sluice");
    let pod = &proxy["spec"]["template"]["spec"];
    let c = &seq(&pod["containers"], "containers")[0];
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );
    let args: Vec<&str> = seq(&c["args"], "args")
        .iter()
        .map(|a| s(a, "arg"))
        .collect();
    assert_eq!(&args[..2], ["serve", "--config"]);
    let config_path = Path::new(args[2]);
    let mount = seq(&c["volumeMounts"], "mounts")
        .iter()
        .find(|m| Path::new(s(&m["mountPath"], "mountPath")) == config_path.parent().unwrap())
        .expect("the config's directory is mounted");
    assert!(
        mount["subPath"].is_null(),
        "a subPath mount never sees ConfigMap edits"
    );
    let volume = seq(&pod["volumes"], "volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let cm = find(
        objs,
        "ConfigMap",
        s(&volume["configMap"]["name"], "configMap"),
    );
    let file = config_path.file_name().unwrap().to_str().unwrap();
    let config = s(&cm["data"][file], "config file in the ConfigMap").to_string();

    // Tenant keys: from the Secret, as the environment the config names.
    let secret_name = seq(&c["envFrom"], "envFrom")
        .iter()
        .find_map(|e| e["secretRef"]["name"].as_str())
        .expect("keys from a Secret");
    let secret = find(objs, "Secret", secret_name);
    let env: Vec<(String, String)> = map(&secret["stringData"], "stringData")
        .iter()
        .map(|(k, v)| (s(k, "k").to_string(), s(v, "v").to_string()))
        .collect();
    for line in config
        .lines()
        .filter(|l| l.trim_start().starts_with("api_key_env"))
    {
        for var in line.split('"').skip(1).step_by(2) {
            assert!(env.iter().any(|(k, _)| k == var), "the Secret has no {var}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    std::fs::write(&path, &config).unwrap();
    check(&path, &env).unwrap_or_else(|e| panic!("{e}"));

    // Graceful shutdown: the grace period covers preStop and the drain.
    let pre_stop: Vec<&str> = seq(&c["lifecycle"]["preStop"]["exec"]["command"], "preStop")
        .iter()
        .map(|a| s(a, "arg"))
        .collect();
    assert_eq!(pre_stop[0], "sleep");
    let sleep_s: u64 = pre_stop[1].parse().unwrap();
    let drain_ms: u64 =
        toml_value(&config, "drain_timeout_ms").map_or(30_000, |v| v.parse().unwrap());
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!(
        grace * 1000 > sleep_s * 1000 + drain_ms,
        "terminationGracePeriodSeconds {grace} s <= preStop {sleep_s} s + drain {drain_ms} ms"
    );
    let replicas = proxy["spec"]["replicas"].as_u64().unwrap();

    // Disruption budget over the proxy pods, leaving room to evict one.
    let pdb = objs
        .iter()
        .find(|o| o["kind"].as_str() == Some("PodDisruptionBudget"))
        .expect("a PodDisruptionBudget");
    assert_eq!(pdb["apiVersion"].as_str(), Some("policy/v1"));
    assert!(selects(
        &label_map(&pdb["spec"]["selector"]["matchLabels"]),
        &label_map(&proxy["spec"]["template"]["metadata"]["labels"])
    ));
    assert!(pdb["spec"]["minAvailable"].as_u64().unwrap() < replicas);

    // The pool's DNS name is the engines' headless Service.
    let dns = toml_value(&config, "dns").expect("the pool discovers replicas by DNS");
    let (host, port) = dns.split_once(':').unwrap();
    let engines = find(objs, "Service", host);
    assert_eq!(
        engines["spec"]["clusterIP"].as_str(),
        Some("None"),
        "headless"
    );
    let port: u64 = port.parse().unwrap();
    assert!(
        seq(&engines["spec"]["ports"], "ports")
            .iter()
            .any(|p| p["port"].as_u64() == Some(port))
    );
    if let Some(url) = toml_value(&config, "redis_url") {
        let host = url
            .trim_start_matches("redis://")
            .split([':', '/'])
            .next()
            .unwrap();
        find(objs, "Service", host);
    }

    // Prometheus Operator: ServiceMonitors select Services and name their ports.
    let monitors: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"].as_str() == Some("ServiceMonitor"))
        .collect();
    assert_eq!(monitors.len(), 2, "one for the proxy, one for the engines");
    for m in monitors {
        assert_eq!(m["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
        let sel = label_map(&m["spec"]["selector"]["matchLabels"]);
        let svc = objs
            .iter()
            .filter(|o| o["kind"].as_str() == Some("Service"))
            .find(|o| selects(&sel, &label_map(&o["metadata"]["labels"])))
            .unwrap_or_else(|| panic!("ServiceMonitor {:?} selects no Service", key(m)));
        for e in seq(&m["spec"]["endpoints"], "endpoints") {
            let port = s(&e["port"], "port");
            assert!(
                seq(&svc["spec"]["ports"], "ports")
                    .iter()
                    .any(|p| p["name"].as_str() == Some(port)),
                "ServiceMonitor port {port} is not a port of {:?}",
                key(svc)
            );
            assert_eq!(e["path"].as_str(), Some("/metrics"));
        }
    }
    let rules = find(objs, "PrometheusRule", "sluice");
    assert_eq!(
        rules["spec"]["groups"],
        yaml("deploy/prometheus/rules.yaml")["groups"],
        "deploy/k8s/base/prometheusrule.yaml differs from deploy/prometheus/rules.yaml"
    );
    config
}

/// The engine Deployment behind the pool's headless Service.
fn engine_container(objs: &[Value], config: &str) -> Value {
    let dns = toml_value(config, "dns").unwrap();
    let svc = find(objs, "Service", dns.split(':').next().unwrap());
    let sel = label_map(&svc["spec"]["selector"]);
    let d = objs
        .iter()
        .filter(|o| o["kind"].as_str() == Some("Deployment"))
        .find(|o| {
            selects(
                &sel,
                &label_map(&o["spec"]["template"]["metadata"]["labels"]),
            )
        })
        .expect("an engine Deployment");
    assert!(d["spec"]["replicas"].as_u64().unwrap() >= 2);
    seq(&d["spec"]["template"]["spec"]["containers"], "containers")[0].clone()
}

fn args_of(c: &Value) -> Vec<String> {
    seq(&c["args"], "args")
        .iter()
        .map(|a| s(a, "arg").to_string())
        .collect()
}

#[test]
fn vllm_overlay() {
    let (_, objs) = overlay("vllm");
    let config = check_common(&objs);
    let c = engine_container(&objs, &config);
    assert!(s(&c["image"], "image").starts_with("vllm/vllm-openai:"));
    let args = args_of(&c);
    assert!(
        args.iter().any(|a| a == "--enable-prefix-caching"),
        "{args:?}"
    );
    let model = toml_value(&config, "model").unwrap();
    assert!(
        args.contains(&format!("--served-model-name={model}")),
        "vLLM must serve the pool's model name {model}: {args:?}"
    );
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"].as_u64(), Some(1));
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/health")
    );
}

#[test]
fn sim_overlay() {
    let (_, objs) = overlay("sim");
    let config = check_common(&objs);
    let c = engine_container(&objs, &config);
    let proxy = find(&objs, "Deployment", "sluice");
    assert_eq!(
        c["image"], proxy["spec"]["template"]["spec"]["containers"][0]["image"],
        "the sim replicas run the proxy's image"
    );
    let args = args_of(&c);
    assert_eq!(args[0], "sim");
    let model = toml_value(&config, "model").unwrap();
    let i = args.iter().position(|a| a == "--model").unwrap();
    assert_eq!(args[i + 1], model);
    starts_with_args(&args);
    // The patch applied: laptop-sized CPU request.
    assert_eq!(
        proxy["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"].as_str(),
        Some("500m")
    );
}

/// `kubectl kustomize` output, or `None` (with a printed reason) without kubectl.
fn kubectl_render(dir: &Path) -> Option<Vec<Value>> {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: kubectl is not installed ({e}); our own render was checked");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &out.stdout).unwrap();
    Some(docs(tmp.path()))
}

#[test]
fn our_render_matches_kubectl_kustomize() {
    for name in ["sim", "vllm"] {
        let (dir, mut ours) = overlay(name);
        let Some(mut theirs) = kubectl_render(&dir) else {
            return;
        };
        ours.sort_by_key(key);
        theirs.sort_by_key(key);
        assert_eq!(
            ours.iter().map(key).collect::<Vec<_>>(),
            theirs.iter().map(key).collect::<Vec<_>>(),
            "{name}: objects differ"
        );
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a, b, "{name}: {:?} renders differently", key(a));
        }
    }
}

#[test]
fn built_in_objects_validate_against_the_kubernetes_schemas() {
    let validator = || {
        let mut c = Command::new("python3");
        c.args(["-m", "kubernetes_validate"]);
        c
    };
    match validator().arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            eprintln!(
                "SKIPPED: the Python package kubernetes-validate is not installed (`./dev setup` installs it with pip)"
            );
            return;
        }
    }
    for name in ["sim", "vllm"] {
        let (_, objs) = overlay(name);
        // As JSON documents: a YAML 1.1 reader (the validator's) would take
        // an unquoted `no` from serde_yaml's output for a boolean.
        let text = objs
            .iter()
            .map(|o| serde_json::to_string(o).unwrap())
            .collect::<Vec<_>>()
            .join("\n---\n");
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), text).unwrap();
        let out = validator()
            .args(["--strict", "--no-warn", "--quiet"])
            .arg(tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
