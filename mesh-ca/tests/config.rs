//! The CA's `Config`s read from YAML (`mesh_net::config::from_yaml`): every
//! field reaches the built server or client, what is wrong is refused with the
//! field's name, and no text makes the readers panic.

use std::sync::Arc;
use std::time::Duration;

use mesh_api::Identity;
use mesh_ca::{
    Authenticated, Authority, CaClient, CaClientConfig, CaHandle, CaServer, CaServerConfig,
    ServingNames, SigningPolicy, StaticNodeAuthorizer, StaticTokens,
};
use mesh_net::HandshakeLimits;
use mesh_net::config::{ConfigError, from_yaml};
use proptest::prelude::*;

fn id(uri: &str) -> Identity {
    uri.parse().expect("identity")
}

/// A CA server configuration with every field.
const SERVER_YAML: &str = "
servingNames:
  dnsNames: [ca.podless.test, localhost]
  ips: [\"127.0.0.1\", \"::1\"]
  validity: 30days
handshakeLimits:
  timeout: 2m
  maxInProgress: 100
  maxInProgressPerIp: 2
nodeAgents:
  - spiffe://cluster.local/ns/istio-system/sa/ztunnel
";

#[test]
fn a_server_config_with_every_field_is_read() {
    let config: CaServerConfig = from_yaml(SERVER_YAML, "ca.yaml").expect("read");
    assert_eq!(
        config.serving_names,
        ServingNames {
            dns_names: vec!["ca.podless.test".into(), "localhost".into()],
            ips: vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()],
            validity: Duration::from_secs(30 * 86400),
        }
    );
    assert_eq!(
        config.handshake_limits,
        HandshakeLimits::default()
            .with_timeout(Duration::from_secs(120))
            .with_max_in_progress(100)
            .with_max_in_progress_per_ip(2)
    );
    assert_eq!(
        config.node_agents,
        vec![id("spiffe://cluster.local/ns/istio-system/sa/ztunnel")]
    );
}

#[test]
fn what_is_left_out_keeps_its_default() {
    let empty: CaServerConfig = from_yaml("", "ca.yaml").expect("read");
    assert_eq!(empty, CaServerConfig::default());
    let some: CaServerConfig =
        from_yaml("servingNames:\n  validity: 1h\n", "ca.yaml").expect("read");
    assert_eq!(some.serving_names.validity, Duration::from_secs(3600));
    assert_eq!(
        some.serving_names.dns_names,
        ServingNames::default().dns_names
    );
    assert_eq!(some.handshake_limits, HandshakeLimits::default());
    let client: CaClientConfig = from_yaml("", "client.yaml").expect("read");
    assert_eq!(client, CaClientConfig::default());
    assert_eq!(client.server_name, "istiod.istio-system.svc");
    assert_eq!(client.timeout, Duration::from_secs(10));
    assert_eq!((client.address, client.socket_mark), (None, None));
    let policy: SigningPolicy = from_yaml("", "policy.yaml").expect("read");
    assert_eq!(policy, SigningPolicy::default());
}

#[test]
fn configs_written_out_read_back_the_same() {
    let server: CaServerConfig = from_yaml(SERVER_YAML, "ca.yaml").expect("read");
    let text = serde_json::to_string(&server).expect("write");
    assert!(text.contains("\"nodeAgents\":[\"spiffe://"), "{text}");
    assert_eq!(
        from_yaml::<CaServerConfig>(&text, "ca.json").expect("read"),
        server
    );
    let client: CaClientConfig = from_yaml(
        "address: \"10.0.0.1:15012\"\nserverName: ca\ntimeout: 3s\nsocketMark: 1337\n",
        "client.yaml",
    )
    .expect("read");
    let text = serde_json::to_string(&client).expect("write");
    assert_eq!(
        from_yaml::<CaClientConfig>(&text, "client.json").expect("read"),
        client
    );
    let policy = SigningPolicy::default();
    let text = serde_json::to_string(&policy).expect("write");
    assert_eq!(
        from_yaml::<SigningPolicy>(&text, "policy.json").expect("read"),
        policy
    );
}

/// `from_yaml`'s error for `text`, which must be refused.
fn refused<T: serde::de::DeserializeOwned + std::fmt::Debug>(text: &str) -> ConfigError {
    from_yaml::<T>(text, "ca.yaml").expect_err("refused")
}

#[test]
fn a_misspelt_field_is_refused_by_name() {
    let err = refused::<CaServerConfig>("nodeAgent: []\n");
    assert!(err.message.contains("unknown field `nodeAgent`"), "{err}");
    assert!(err.message.contains("nodeAgents"), "{err}");
    let err = refused::<CaServerConfig>("servingNames:\n  dnsName: [a]\n");
    assert_eq!(err.path, "servingNames.dnsName", "{err}");
    assert!(err.message.contains("unknown field `dnsName`"), "{err}");
    let err = refused::<CaServerConfig>("handshakeLimits:\n  timeOut: 1s\n");
    assert_eq!(err.path, "handshakeLimits.timeOut", "{err}");
    assert!(err.message.contains("unknown field `timeOut`"), "{err}");
    let err = refused::<CaClientConfig>("server_name: ca\n");
    assert!(err.message.contains("unknown field `server_name`"), "{err}");
    assert!(err.message.contains("serverName"), "{err}");
    let err = refused::<CaClientConfig>("token: s3cret\n");
    assert!(
        err.message.contains("unknown field `token`"),
        "tokens are not config: {err}"
    );
    let err = refused::<SigningPolicy>("maxTTL: 1h\n");
    assert!(err.message.contains("unknown field `maxTTL`"), "{err}");
}

#[test]
fn a_bad_value_names_its_field() {
    for (text, path) in [
        (
            "servingNames:\n  ips: [\"127.0.0.1\", localhost]\n",
            "servingNames.ips[1]",
        ),
        (
            "servingNames:\n  validity: a year\n",
            "servingNames.validity",
        ),
        (
            "servingNames:\n  dnsNames: ca.example\n",
            "servingNames.dnsNames",
        ),
        (
            "handshakeLimits:\n  maxInProgress: -1\n",
            "handshakeLimits.maxInProgress",
        ),
        (
            "nodeAgents: spiffe://cluster.local/ns/a/sa/b\n",
            "nodeAgents",
        ),
    ] {
        let err = refused::<CaServerConfig>(text);
        assert_eq!(err.path, path, "{text}: {err}");
        assert!(
            err.to_string().starts_with(&format!("ca.yaml: {path}: ")),
            "{err}"
        );
    }
    for (text, path) in [
        ("address: 10.0.0.1\n", "address"),
        ("timeout: 10\n", "timeout"),
        ("socketMark: -3\n", "socketMark"),
        ("socketMark: 4294967296\n", "socketMark"),
    ] {
        let err = refused::<CaClientConfig>(text);
        assert_eq!(err.path, path, "{text}: {err}");
    }
    let err = refused::<SigningPolicy>("defaultTtl: tomorrow\n");
    assert_eq!(err.path, "defaultTtl", "{err}");
}

#[test]
fn a_bad_identity_is_named_with_its_place() {
    let err = refused::<CaServerConfig>(
        "nodeAgents:\n  - spiffe://cluster.local/ns/istio-system/sa/ztunnel\n  - ztunnel\n",
    );
    assert_eq!(err.path, "nodeAgents[1]", "{err}");
    assert!(
        err.message.contains("invalid SPIFFE identity \"ztunnel\""),
        "{err}"
    );
    let err = refused::<CaServerConfig>("nodeAgents: [\"spiffe://cluster.local/ns/a/sa/b/c\"]\n");
    assert_eq!(err.path, "nodeAgents[0]", "{err}");
    assert!(
        err.message.contains("spiffe://cluster.local/ns/a/sa/b/c"),
        "{err}"
    );
    let err = refused::<CaServerConfig>("nodeAgents: [7]\n");
    assert_eq!(err.path, "nodeAgents[0]", "{err}");
}

/// A CA on loopback built from `config`, with a token for shell, one for a
/// node agent on node-a (`agent`) and echo running there.
async fn serve(config: CaServerConfig, agent: &Identity) -> (CaHandle, Arc<Authority>) {
    let material =
        mesh_ca::CaMaterial::self_signed("cluster.local", Duration::from_secs(365 * 86400))
            .expect("material");
    let authority = Arc::new(
        Authority::new(&material, "cluster.local", SigningPolicy::default()).expect("authority"),
    );
    let tokens = StaticTokens::new()
        .token(
            "shell-token",
            id("spiffe://cluster.local/ns/default/sa/shell"),
        )
        .caller(
            "agent-token",
            Authenticated {
                identity: agent.clone(),
                node: Some("node-a".into()),
                pod: None,
            },
        );
    let server = CaServer::builder()
        .config(config)
        .authority(authority.clone())
        .authenticator(tokens)
        .node_authorizer(
            StaticNodeAuthorizer::new()
                .workload("node-a", id("spiffe://cluster.local/ns/default/sa/echo")),
        )
        .build()
        .expect("build");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    (server.spawn(listener).expect("spawn"), authority)
}

#[tokio::test]
async fn a_server_built_from_yaml_serves_as_configured() {
    let config: CaServerConfig = from_yaml(SERVER_YAML, "ca.yaml").expect("read");
    let ztunnel = id("spiffe://cluster.local/ns/istio-system/sa/ztunnel");
    let (handle, authority) = serve(config, &ztunnel).await;
    let address = handle.local_addr();
    let client = |server_name: &str, token: &str| {
        let config: CaClientConfig = from_yaml(
            &format!("address: \"{address}\"\nserverName: {server_name}\ntimeout: 5s\n"),
            "client.yaml",
        )
        .expect("client config");
        CaClient::builder()
            .config(config)
            .roots(authority.roots().iter().cloned())
            .token(token)
            .build()
            .expect("client")
    };
    let shell = id("spiffe://cluster.local/ns/default/sa/shell");

    // The configured name is on the serving certificate; the default one,
    // which the configured list replaced, is not.
    let issued = client("ca.podless.test", "shell-token")
        .certificate(&shell, false, None)
        .await
        .expect("ca.podless.test is served");
    assert_eq!(issued.identity, shell);
    client("istiod.istio-system.svc", "shell-token")
        .certificate(&shell, false, None)
        .await
        .expect_err("istiod.istio-system.svc is not in the configured names");

    // The node agent named in the configuration may impersonate a workload
    // on its node.
    let echo = id("spiffe://cluster.local/ns/default/sa/echo");
    let issued = client("ca.podless.test", "agent-token")
        .certificate(&echo, true, None)
        .await
        .expect("a configured node agent");
    assert_eq!(issued.identity, echo);

    // At most 2 clients of one address in handshake: of 5 idle ones (the
    // 2-minute deadline far off), the 3 oldest were closed to make room.
    test_support::assert_oldest_crowded_out(address, [127, 0, 0, 9].into(), 5, 3).await;
    handle.shutdown();
}

#[tokio::test]
async fn an_agent_missing_from_the_configured_node_agents_may_not_impersonate() {
    let config: CaServerConfig = from_yaml(SERVER_YAML, "ca.yaml").expect("read");
    let stranger = id("spiffe://cluster.local/ns/istio-system/sa/stranger");
    let (handle, authority) = serve(config, &stranger).await;
    let client = CaClient::builder()
        .config(
            from_yaml(
                &format!(
                    "address: \"{}\"\nserverName: localhost\n",
                    handle.local_addr()
                ),
                "client.yaml",
            )
            .expect("client config"),
        )
        .roots(authority.roots().iter().cloned())
        .token("agent-token")
        .build()
        .expect("client");
    let echo = id("spiffe://cluster.local/ns/default/sa/echo");
    let status = match client.certificate(&echo, true, None).await {
        Err(mesh_ca::ClientError::Status(status)) => status,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    handle.shutdown();
}

#[test]
fn configured_node_agents_need_a_node_authorizer() {
    let config: CaServerConfig = from_yaml(SERVER_YAML, "ca.yaml").expect("read");
    let material =
        mesh_ca::CaMaterial::self_signed("cluster.local", Duration::from_secs(365 * 86400))
            .expect("material");
    let authority = Arc::new(
        Authority::new(&material, "cluster.local", SigningPolicy::default()).expect("authority"),
    );
    let err = CaServer::builder()
        .config(config)
        .authority(authority)
        .authenticator(StaticTokens::new())
        .build()
        .expect_err("refused");
    assert!(matches!(
        err,
        mesh_ca::server::BuildError::NodeAgentsWithoutAuthorizer
    ));
}

#[tokio::test]
async fn a_client_config_needs_an_address_from_somewhere() {
    let material =
        mesh_ca::CaMaterial::self_signed("cluster.local", Duration::from_secs(365 * 86400))
            .expect("material");
    let authority =
        Authority::new(&material, "cluster.local", SigningPolicy::default()).expect("authority");
    let err = CaClient::builder()
        .config(CaClientConfig::default())
        .roots(authority.roots().iter().cloned())
        .build()
        .expect_err("no address");
    assert!(err.to_string().contains("no CA address"), "{err}");
    let config: CaClientConfig = from_yaml(
        "address: \"127.0.0.1:15012\"\nserverName: ca\ntimeout: 1s\nsocketMark: 1337\n",
        "client.yaml",
    )
    .expect("read");
    assert_eq!(config.socket_mark, Some(1337));
    CaClient::builder()
        .config(config)
        .roots(authority.roots().iter().cloned())
        .build()
        .expect("built; nothing connects yet");
}

#[test]
fn a_signing_policy_from_yaml_sets_the_validity() {
    let policy: SigningPolicy =
        from_yaml("defaultTtl: 1h\nmaxTtl: 2h\nbackdate: 1m\n", "policy.yaml").expect("read");
    assert_eq!(
        policy,
        SigningPolicy {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(7200),
            backdate: Duration::from_secs(60),
        }
    );
    let material =
        mesh_ca::CaMaterial::self_signed("cluster.local", Duration::from_secs(365 * 86400))
            .expect("material");
    let authority = Authority::new(&material, "cluster.local", policy).expect("authority");
    assert_eq!(authority.policy(), policy);
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics_the_readers(text in ".{0,200}") {
        let _ = from_yaml::<CaServerConfig>(&text, "fuzz.yaml");
        let _ = from_yaml::<CaClientConfig>(&text, "fuzz.yaml");
        let _ = from_yaml::<SigningPolicy>(&text, "fuzz.yaml");
        let _ = from_yaml::<ServingNames>(&text, "fuzz.yaml");
    }

    #[test]
    fn arbitrary_node_agent_lists_never_panic(
        agents in proptest::collection::vec("(spiffe://)?[a-z./]{0,30}", 0..5)
    ) {
        let text = format!("nodeAgents: {}", serde_json::to_string(&agents).expect("JSON"));
        match from_yaml::<CaServerConfig>(&text, "fuzz.yaml") {
            Ok(config) => prop_assert_eq!(config.node_agents.len(), agents.len()),
            Err(err) => prop_assert!(err.path.starts_with("nodeAgents["), "{}", err),
        }
    }
}

/// The `yaml` blocks of the README's Configuration section, in order.
fn readme_yaml() -> Vec<String> {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("a Configuration section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .split("```yaml\n")
        .skip(1)
        .map(|block| {
            block
                .split("```")
                .next()
                .expect("a closed block")
                .to_owned()
        })
        .collect()
}

#[test]
fn the_readme_samples_are_valid_and_show_the_defaults() {
    let blocks = readme_yaml();
    assert_eq!(blocks.len(), 3, "{blocks:?}");
    let server: CaServerConfig = from_yaml(&blocks[0], "README server").expect("valid");
    assert_eq!(server, CaServerConfig::default());
    let client: CaClientConfig = from_yaml(&blocks[1], "README client").expect("valid");
    assert_eq!(client.server_name, CaClientConfig::default().server_name);
    assert_eq!(client.timeout, CaClientConfig::default().timeout);
    let policy: SigningPolicy = from_yaml(&blocks[2], "README policy").expect("valid");
    assert_eq!(policy, SigningPolicy::default());
}

#[test]
fn durations_out_of_bounds_are_refused_before_serving() {
    let material =
        mesh_ca::CaMaterial::self_signed("cluster.local", Duration::from_secs(365 * 86400))
            .expect("material");
    let authority = || {
        Arc::new(
            Authority::new(&material, "cluster.local", SigningPolicy::default())
                .expect("authority"),
        )
    };
    let build = |yaml: &str, authenticators: mesh_ca::Authenticators| {
        let config: CaServerConfig = from_yaml(yaml, "ca.yaml").expect("read");
        CaServer::builder()
            .config(config)
            .authority(authority())
            .authenticators(authenticators)
            .build()
    };
    let tokens = || mesh_ca::Authenticators::new().with(StaticTokens::new());
    for yaml in [
        "servingNames:\n  validity: 0s\n",
        "servingNames:\n  validity: 59m\n",
        "servingNames:\n  validity: 1000years\n",
    ] {
        assert!(
            matches!(
                build(yaml, tokens()),
                Err(mesh_ca::server::BuildError::ServingValidity(_))
            ),
            "{yaml}"
        );
    }
    assert!(build("servingNames:\n  validity: 1h\n", tokens()).is_ok());
    // A CA signs only for callers it knows.
    assert!(matches!(
        build(
            "",
            mesh_ca::Authenticators::anonymous().with(StaticTokens::new())
        ),
        Err(mesh_ca::server::BuildError::AnonymousCallers)
    ));

    for yaml in [
        "maxTtl: 1000years\n",
        "defaultTtl: 0s\n",
        "defaultTtl: 100days\nmaxTtl: 90days\n",
        "backdate: 2days\n",
    ] {
        let policy: SigningPolicy = from_yaml(yaml, "policy.yaml").expect("read");
        let err = Authority::new(&material, "cluster.local", policy)
            .err()
            .unwrap_or_else(|| panic!("{yaml} accepted"));
        assert!(err.to_string().starts_with("signing policy: "), "{err}");
    }
}
