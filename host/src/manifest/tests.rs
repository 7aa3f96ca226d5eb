use super::*;

fn manifest_with(wasm: &Path, extra_component: &str, top: &str) -> String {
    format!(
        r#"
{top}
[gateway]
port = 3005

[components.order]
wasm = "{wasm}"
port = 3002
topics = ["orders", "payments"]
group = "order-service"
{extra_component}
"#,
        wasm = wasm.display()
    )
}

fn check(text: &str) -> Result<Manifest, String> {
    let manifest = Manifest::parse(text)?;
    manifest.validate().map_err(|e| e.to_string())?;
    Ok(manifest)
}

fn wasm_file() -> (tempdir::TempDir, PathBuf) {
    let dir = tempdir::TempDir::new();
    let path = dir.path().join("c.wasm");
    std::fs::write(&path, b"\0asm").unwrap();
    (dir, path)
}

/// A throwaway directory, removed on drop.
mod tempdir {
    pub struct TempDir(std::path::PathBuf);
    impl TempDir {
        pub fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("manifest-test-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn defaults_apply() {
    let (_dir, wasm) = wasm_file();
    let m = check(&manifest_with(&wasm, "", "")).unwrap();
    assert_eq!(m.kafka.partitions, 3);
    assert_eq!(m.http.bind.to_string(), "127.0.0.1");
    let order = &m.components["order"];
    assert_eq!((order.timeout_ms, order.memory_mib, order.max_attempts), (1000, 64, 5));
    assert_eq!(m.logical_topics(), ["dead-letters", "orders", "payments"]);
    assert_eq!((m.state.backend, m.state.url.as_deref(), m.state.schema.as_str()), (StateBackend::Redb, None, "shop"));
}

#[test]
fn ports_move_by_an_offset() {
    let (_dir, wasm) = wasm_file();
    let mut m = check(&manifest_with(&wasm, "", "")).unwrap();
    m.offset_ports(100).unwrap();
    assert_eq!((m.gateway.port, m.admin.port, m.components["order"].port), (3105, 3190, 3102));
    let err = m.offset_ports(65_000).unwrap_err().to_string();
    assert!(err.contains("gateway.port") && err.contains("65535"), "{err}");
}

#[test]
fn the_state_backend_is_chosen_and_checked() {
    let (_dir, wasm) = wasm_file();
    let top = "[state]\nbackend = \"postgres\"\nurl = \"postgres://u@db/shop\"\nschema = \"prod_1\"";
    let m = check(&manifest_with(&wasm, "", top)).unwrap();
    assert_eq!((m.state.backend, m.state.schema.as_str()), (StateBackend::Postgres, "prod_1"));
    let err = check(&manifest_with(&wasm, "", "[state]\nbackend = \"sqlite\"")).unwrap_err();
    assert!(err.contains("unknown variant `sqlite`"), "{err}");
    let err = check(&manifest_with(&wasm, "", "[state]\nschema = \"Drop Table\"")).unwrap_err();
    assert!(err.contains("state.schema"), "{err}");
    assert_eq!("postgres".parse::<StateBackend>(), Ok(StateBackend::Postgres));
    assert!("mysql".parse::<StateBackend>().unwrap_err().contains("redb"));
}

#[test]
fn unknown_key_is_named() {
    let (_dir, wasm) = wasm_file();
    let err = check(&manifest_with(&wasm, "prot = 1", "")).unwrap_err();
    assert!(err.contains("unknown field `prot`"), "{err}");
}

#[test]
fn invalid_values_name_their_key() {
    let (_dir, wasm) = wasm_file();
    let cases = [
        ("", "[kafka]\npartitions = 0", "kafka.partitions"),
        ("", "[kafka]\ntopic_prefix = \"a b\"", "kafka.topic_prefix"),
        ("timeout_ms = 0", "", "components.order.timeout_ms"),
        ("", "[runtime]\ndrain_timeout_ms = 5", "runtime.drain_timeout_ms"),
        ("", "[http]\nbind = \"nowhere\"", "invalid IP address"),
    ];
    for (component, top, needle) in cases {
        let err = check(&manifest_with(&wasm, component, top)).unwrap_err();
        assert!(err.contains(needle), "expected {needle:?} in {err}");
    }
}

#[test]
fn duplicate_port_and_missing_wasm_are_rejected() {
    let (_dir, wasm) = wasm_file();
    let mut text = manifest_with(&wasm, "", "");
    text.push_str(
        r#"
[components.payment]
wasm = "/nonexistent/payment.wasm"
port = 3005
topics = ["payments"]
group = "payment-service"
"#,
    );
    let err = check(&text).unwrap_err();
    assert!(err.contains("components.payment.port") && err.contains("the gateway"), "{err}");
    let err = check(&text.replace("port = 3005\ntopics", "port = 3001\ntopics")).unwrap_err();
    assert!(err.contains("components.payment.wasm") && err.contains("build-components"), "{err}");
}

#[test]
fn gateway_needs_its_order_component() {
    let (_dir, wasm) = wasm_file();
    let text = manifest_with(&wasm, "", "")
        .replace("[gateway]\nport = 3005", "[gateway]\nport = 3005\norder_component = \"orders\"");
    let err = check(&text).unwrap_err();
    assert!(err.contains("gateway.order_component"), "{err}");
}

#[test]
fn load_resolves_paths_against_the_manifest() {
    let dir = tempdir::TempDir::new();
    std::fs::write(dir.path().join("c.wasm"), b"\0asm").unwrap();
    let path = dir.path().join("app.toml");
    std::fs::write(&path, manifest_with(Path::new("c.wasm"), "", "")).unwrap();
    let m = Manifest::load(&path).unwrap();
    assert_eq!(m.components["order"].wasm, dir.path().join("c.wasm"));
    let err = Manifest::load(&dir.path().join("missing.toml")).unwrap_err();
    assert!(err.to_string().contains("cannot read manifest"), "{err}");
}

#[test]
fn guest_limits_have_defaults_and_bounds() {
    let (_dir, wasm) = wasm_file();
    let m = check(&manifest_with(&wasm, "", "")).unwrap();
    let order = &m.components["order"];
    let limits = (
        order.stack_kib,
        order.max_writes_per_call,
        order.max_write_bytes_per_call,
        order.max_timers_per_call,
        order.max_concurrent_queries,
        order.cpu_burst_ms,
        order.cpu_percent,
    );
    assert_eq!(limits, (512, 1000, 8 << 20, 100, 4, 100, 5));
    let m = check(&manifest_with(&wasm, "stack_kib = 2048\nmax_timers_per_call = 0", "")).unwrap();
    assert_eq!((m.components["order"].stack_kib, m.components["order"].max_timers_per_call), (2048, 0));
    for (component, needle) in [
        ("stack_kib = 8192", "components.order.stack_kib"),
        ("stack_kib = 16", "components.order.stack_kib"),
        ("max_writes_per_call = 0", "components.order.max_writes_per_call"),
        ("max_write_bytes_per_call = 10", "components.order.max_write_bytes_per_call"),
        ("max_timers_per_call = 100000", "components.order.max_timers_per_call"),
        ("max_concurrent_queries = 0", "components.order.max_concurrent_queries"),
        ("cpu_burst_ms = 0", "components.order.cpu_burst_ms"),
        ("cpu_percent = 0", "components.order.cpu_percent"),
        ("cpu_percent = 101", "components.order.cpu_percent"),
    ] {
        let err = check(&manifest_with(&wasm, component, "")).unwrap_err();
        assert!(err.contains(needle), "expected {needle:?} in {err}");
    }
}

#[test]
fn kafka_properties_reach_librdkafka_with_tls_and_sasl() {
    let (_dir, wasm) = wasm_file();
    let top = r#"
[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "shop"
"sasl.password" = "secret"
"ssl.endpoint.identification.algorithm" = "https"
"client.id" = "shop-eu-1"
"#;
    let m = check(&manifest_with(&wasm, "", top)).unwrap();
    assert_eq!(m.kafka.properties.len(), 6);
    assert_eq!(m.kafka.properties["security.protocol"], "SASL_SSL");
    // Without TLS compiled in, librdkafka refuses these at once.
    for protocol in ["SSL", "SASL_SSL", "SASL_PLAINTEXT"] {
        let top = format!("[kafka.properties]\n\"security.protocol\" = \"{protocol}\"");
        check(&manifest_with(&wasm, "", &top)).unwrap();
    }
    let top = "[kafka.properties]\n\"sasl.mechanism\" = \"OAUTHBEARER\"";
    check(&manifest_with(&wasm, "", top)).unwrap();
}

#[test]
fn kafka_properties_the_host_sets_are_refused() {
    let (_dir, wasm) = wasm_file();
    for (key, value, reason) in [
        ("enable.auto.offset.store", "true", "at-least-once"),
        ("enable.idempotence", "false", "idempotent"),
        ("acks", "1", "in-sync replica"),
        ("bootstrap.servers", "elsewhere:9092", "KAFKA_BROKERS"),
        ("group.id", "mine", "components.NAME.group"),
        ("message.timeout.ms", "100", "gateway.publish_timeout_ms"),
    ] {
        let top = format!("[kafka.properties]\n\"{key}\" = \"{value}\"");
        let err = check(&manifest_with(&wasm, "", &top)).unwrap_err();
        assert!(
            err.contains(&format!("kafka.properties.\"{key}\""))
                && err.contains("cannot be overridden")
                && err.contains(reason),
            "{key}: {err}"
        );
    }
}

/// librdkafka dlopens a plugin as soon as the property is set: refused
/// before it gets there, so `host check` never runs a manifest's code.
#[test]
fn kafka_properties_that_load_native_code_are_refused() {
    let (_dir, wasm) = wasm_file();
    for key in crate::manifest::FORBIDDEN_PROPERTIES {
        let top = format!("[kafka.properties]\n\"{key}\" = \"/tmp/planted.so\"");
        let err = check(&manifest_with(&wasm, "", &top)).unwrap_err();
        assert!(err.contains(&format!("kafka.properties.\"{key}\"")) && err.contains("loads native code"), "{err}");
    }
}

#[test]
fn kafka_properties_librdkafka_does_not_know_are_refused() {
    let (_dir, wasm) = wasm_file();
    let err = check(&manifest_with(&wasm, "", "[kafka.properties]\n\"sasl.pasword\" = \"hunter2\"")).unwrap_err();
    assert!(
        err.contains("kafka.properties.\"sasl.pasword\"") && err.contains("No such configuration property"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "a value under a misspelt key may be a secret: {err}");
    let err = check(&manifest_with(&wasm, "", "[kafka.properties]\n\"security.protocol\" = \"pigeon\"")).unwrap_err();
    assert!(err.contains("security.protocol") && err.contains("Invalid value"), "{err}");
    let err = check(&manifest_with(&wasm, "", "[kafka.properties]\n\"linger.ms\" = 5")).unwrap_err();
    assert!(err.contains("invalid type: integer"), "values are strings: {err}");
}

#[test]
fn every_client_gets_the_properties_but_never_a_reserved_one() {
    let properties: BTreeMap<String, String> = [("client.rack", "rack-under-test"), ("enable.idempotence", "false")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    crate::kafka::set_properties(&properties);
    let producer = crate::kafka::producer_config("127.0.0.1:1");
    let consumer = crate::kafka::consumer_config("127.0.0.1:1", "g");
    crate::kafka::set_properties(&BTreeMap::new());
    for config in [&producer, &consumer] {
        assert_eq!(config.get("client.rack"), Some("rack-under-test"));
        assert_eq!(config.get("bootstrap.servers"), Some("127.0.0.1:1"));
    }
    assert_eq!(producer.get("enable.idempotence"), Some("true"));
    assert_eq!(crate::kafka::client_config("b:1").get("client.rack"), None);
}

#[test]
fn the_admin_api_binds_loopback_unless_told() {
    let (_dir, wasm) = wasm_file();
    let m = check(&manifest_with(&wasm, "", "")).unwrap();
    assert_eq!(m.admin.bind.to_string(), "127.0.0.1");
    let m = check(&manifest_with(&wasm, "", "[http]\nbind = \"0.0.0.0\"\n[admin]\nbind = \"::1\"")).unwrap();
    assert_eq!((m.http.bind.to_string(), m.admin.bind.to_string()), ("0.0.0.0".into(), "::1".into()));
}

#[test]
fn shadow_settings_have_defaults_and_bounds() {
    let (_dir, wasm) = wasm_file();
    let m = check(&manifest_with(&wasm, "", "")).unwrap();
    let shadow = &m.components["order"].shadow;
    assert_eq!((shadow.cpu_percent, shadow.every, shadow.queries, shadow.promote_after), (5, 1, true, 0));
    let block = "[components.order.shadow]\nignore = [\"payment_id\", \"lines.*.sku\"]\nevery = 4\npromote_after = 500";
    let m = check(&manifest_with(&wasm, block, "")).unwrap();
    let shadow = &m.components["order"].shadow;
    assert_eq!((shadow.ignore.len(), shadow.every, shadow.promote_after), (2, 4, 500));
    for (block, needle) in [
        ("cpu_percent = 0", "components.order.shadow.cpu_percent"),
        ("every = 0", "components.order.shadow.every"),
        ("keep = 0", "components.order.shadow.keep"),
        ("queue = 0", "components.order.shadow.queue"),
        ("ignore = [\"a..b\"]", "components.order.shadow.ignore"),
        ("ignore = [\"\"]", "components.order.shadow.ignore"),
        ("unknown = 1", "unknown field"),
    ] {
        let err = check(&manifest_with(&wasm, &format!("[components.order.shadow]\n{block}"), "")).unwrap_err();
        assert!(err.contains(needle), "expected {needle:?} in {err}");
    }
}
