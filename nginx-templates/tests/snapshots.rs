//! Rendered output is pinned byte for byte (`insta`), and real nginx accepts every rendered
//! config (`nginx -t`). After an intended change: `cargo insta review`, or
//! `INSTA_UPDATE=always cargo test -p nginx-templates` and review the diff.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cases() -> Vec<(&'static str, String)> {
    vec![
        ("defaults", "{}".to_owned()),
        (
            "example",
            std::fs::read_to_string(root().join("../config/pod-nginx.example.toml")).unwrap(),
        ),
        (
            "http-no-allow-list",
            r#"{"listen_port": 8080, "default_port": 5173, "forwarded_proto": "http",
                "trusted_proxies": ["127.0.0.1"], "proxy_timeout": "1h", "connect_timeout": "5s",
                "runtime": {"access_log": "off"}}"#
                .to_owned(),
        ),
    ]
}

#[test]
fn rendered_configs_match_their_snapshots_and_pass_nginx_t() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nginx-templates-snapshots");
    std::fs::create_dir_all(&dir).unwrap();
    // The configs use the pod's real paths (/run, /var/log/nginx, /var/lib/nginx).
    std::fs::create_dir_all("/var/log/nginx").ok();
    std::fs::create_dir_all("/var/lib/nginx").ok();
    for (name, input) in cases() {
        let rendered =
            nginx_templates::render_text(&input).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            rendered,
            nginx_templates::render_text(&input).unwrap(),
            "{name}: not deterministic"
        );
        insta::assert_snapshot!(name, rendered);
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, &rendered).unwrap();
        if let Err(e) = pinacle_testkit::nginx::check(&path) {
            panic!("nginx -t rejects {name}: {e}");
        }
    }
}

#[test]
fn invalid_input_names_each_field() {
    let err = nginx_templates::render_text(r#"{"allowed_ports": [3000, 3000], "default_port": 0}"#)
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("default_port") && text.contains("allowed_ports[1]"),
        "{text}"
    );
    let err = nginx_templates::render_text("listen_port = 80\nbogus = 1\n").unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
}
