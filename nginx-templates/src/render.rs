//! Renders a validated [`PodNginx`] to nginx.conf text. Pure and deterministic: the same input
//! gives byte-identical output (ports are sorted, nothing depends on time or environment).

use std::fmt::Write as _;

use crate::config::PodNginx;

/// Response header marking answers that the pod's nginx made itself.
pub const MARKER_HEADER: &str = "X-Pinacle-Pod-Router";

/// The nginx.conf text for `config`.
pub fn render(config: &PodNginx) -> String {
    let mut out = String::with_capacity(4096);
    // `write!` into a String cannot fail.
    let _ = write_config(&mut out, config);
    out
}

fn write_config(o: &mut String, c: &PodNginx) -> std::fmt::Result {
    let temp = &c.temp_dir;
    writeln!(
        o,
        "# Rendered by nginx-templates (pinacle-ingress render-nginx). Do not edit by hand."
    )?;
    writeln!(
        o,
        "# Routes localhost-<port>-pod-<slug>.<domain> to 127.0.0.1:<port> inside the pod."
    )?;
    writeln!(o, "worker_processes 1;")?;
    writeln!(o, "pid {};", c.pid_path)?;
    writeln!(o, "error_log {} warn;", c.error_log)?;
    writeln!(o)?;
    writeln!(o, "events {{\n    worker_connections 4096;\n}}\n")?;
    writeln!(o, "http {{")?;
    writeln!(o, "    access_log {};", c.access_log)?;
    for (directive, dir) in [
        ("client_body_temp_path", "client_body"),
        ("proxy_temp_path", "proxy"),
        ("fastcgi_temp_path", "fastcgi"),
        ("uwsgi_temp_path", "uwsgi"),
        ("scgi_temp_path", "scgi"),
    ] {
        writeln!(o, "    {directive} {temp}/{dir};")?;
    }
    writeln!(o, "    server_tokens off;")?;
    writeln!(o)?;
    writeln!(
        o,
        "    # WebSocket upgrades pass through; other requests may keep the connection alive."
    )?;
    writeln!(
        o,
        "    map $http_upgrade $connection_upgrade {{\n        default upgrade;\n        '' '';\n    }}\n"
    )?;
    writeln!(
        o,
        "    # The target port comes from the Host the ingress sets (current and legacy forms)."
    )?;
    writeln!(o, "    map $http_host $pinacle_target_port {{")?;
    writeln!(o, "        default {};", c.default_port)?;
    writeln!(o, "        \"~*^localhost-(?<p>[0-9]{{1,5}})-pod-\" $p;")?;
    writeln!(o, "        \"~*^localhost-(?<p>[0-9]{{1,5}})\\.pod-\" $p;")?;
    writeln!(o, "    }}\n")?;
    match &c.allowed_ports {
        Some(ports) => {
            writeln!(o, "    # Only the ports this pod declares are routed.")?;
            writeln!(
                o,
                "    map $pinacle_target_port $pinacle_port_allowed {{\n        default 0;"
            )?;
            for port in ports {
                writeln!(o, "        {port} 1;")?;
            }
            writeln!(o, "    }}\n")?;
        }
        None => {
            writeln!(o, "    # Every port 1..65535 is routed.")?;
            writeln!(o, "    map $pinacle_target_port $pinacle_port_allowed {{")?;
            writeln!(o, "        default 0;")?;
            writeln!(
                o,
                "        \"~^([1-9][0-9]{{0,3}}|[1-5][0-9]{{4}}|6[0-4][0-9]{{3}}|65[0-4][0-9]{{2}}|655[0-2][0-9]|6553[0-5])$\" 1;"
            )?;
            writeln!(o, "    }}\n")?;
        }
    }
    writeln!(
        o,
        "    map $http_accept $pinacle_wants_html {{\n        default 0;\n        \"~*text/html\" 1;\n    }}\n"
    )?;
    writeln!(
        o,
        "    map $pinacle_port_allowed$pinacle_wants_html $pinacle_port_rejection {{"
    )?;
    writeln!(
        o,
        "        default \"\";\n        00 json;\n        01 html;\n    }}\n"
    )?;
    if !c.trusted_proxies.is_empty() {
        writeln!(
            o,
            "    # X-Forwarded-For is believed only from the ingress."
        )?;
        for proxy in &c.trusted_proxies {
            writeln!(o, "    set_real_ip_from {proxy};")?;
        }
        writeln!(
            o,
            "    real_ip_header X-Forwarded-For;\n    real_ip_recursive on;\n"
        )?;
    }
    writeln!(o, "    server {{")?;
    writeln!(o, "        listen {} default_server;", c.listen_port)?;
    writeln!(o, "        server_name _;\n")?;
    writeln!(
        o,
        "        # Stream everything: uploads, downloads, server-sent events, WebSockets."
    )?;
    writeln!(o, "        client_max_body_size 0;")?;
    writeln!(o, "        proxy_request_buffering off;")?;
    writeln!(o, "        proxy_buffering off;")?;
    writeln!(o, "        proxy_http_version 1.1;")?;
    writeln!(
        o,
        "        proxy_connect_timeout {}s;",
        c.connect_timeout_secs
    )?;
    writeln!(o, "        proxy_read_timeout {}s;", c.proxy_timeout_secs)?;
    writeln!(o, "        proxy_send_timeout {}s;", c.proxy_timeout_secs)?;
    writeln!(o, "        send_timeout {}s;\n", c.proxy_timeout_secs)?;
    writeln!(o, "        location = {} {{", c.health_path)?;
    writeln!(o, "            access_log off;")?;
    writeln!(o, "            default_type application/json;")?;
    writeln!(o, "            add_header {MARKER_HEADER} health always;")?;
    writeln!(o, "            return 200 '{{\"status\":\"ok\"}}\\n';")?;
    writeln!(o, "        }}\n")?;
    writeln!(o, "        location / {{")?;
    writeln!(
        o,
        "            if ($pinacle_port_rejection = json) {{\n                rewrite ^ /__pinacle/port-not-exposed.json last;\n            }}"
    )?;
    writeln!(
        o,
        "            if ($pinacle_port_rejection = html) {{\n                rewrite ^ /__pinacle/port-not-exposed.html last;\n            }}"
    )?;
    writeln!(
        o,
        "            proxy_pass http://127.0.0.1:$pinacle_target_port;"
    )?;
    writeln!(
        o,
        "            proxy_set_header Host localhost:$pinacle_target_port;"
    )?;
    writeln!(o, "            proxy_set_header X-Real-IP $remote_addr;")?;
    writeln!(
        o,
        "            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"
    )?;
    writeln!(
        o,
        "            proxy_set_header X-Forwarded-Proto {};",
        c.forwarded_proto
    )?;
    writeln!(o, "            proxy_set_header X-Forwarded-Host $host;")?;
    writeln!(o, "            proxy_set_header Upgrade $http_upgrade;")?;
    writeln!(
        o,
        "            proxy_set_header Connection $connection_upgrade;"
    )?;
    writeln!(
        o,
        "            # nginx's own 502 (nothing listens) and 504 (no answer in time), marked so\n            \
         # that the ingress can tell them from the app's own, which pass untouched."
    )?;
    writeln!(o, "            error_page 502 @pinacle_not_listening;")?;
    writeln!(o, "            error_page 504 @pinacle_timeout;")?;
    writeln!(o, "        }}\n")?;
    write_failure(
        o,
        "not_listening",
        502,
        "not-listening",
        "Nothing is listening on port $pinacle_target_port",
    )?;
    writeln!(o)?;
    write_failure(
        o,
        "timeout",
        504,
        "timeout",
        "The app on port $pinacle_target_port did not answer in time",
    )?;
    writeln!(o)?;
    write_rejection(
        o,
        "json",
        "application/json",
        "{\"error\":\"Port $pinacle_target_port is not exposed by this pod\",\"port\":$pinacle_target_port}",
    )?;
    writeln!(o)?;
    write_rejection(
        o,
        "html",
        "text/html",
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Port $pinacle_target_port is not exposed</title></head><body><h1>Port $pinacle_target_port is not exposed</h1><p>This pod does not declare a service on port $pinacle_target_port. Add it to the pod&#39;s services, or open one of its declared ports.</p></body></html>",
    )?;
    writeln!(o, "    }}")?;
    writeln!(o, "}}")?;
    Ok(())
}

/// A named location answering nginx's own failure to reach the port, marked `marker`.
fn write_failure(
    o: &mut String,
    name: &str,
    status: u16,
    marker: &str,
    error: &str,
) -> std::fmt::Result {
    writeln!(o, "        location @pinacle_{name} {{")?;
    writeln!(o, "            default_type application/json;")?;
    writeln!(o, "            add_header {MARKER_HEADER} {marker} always;")?;
    writeln!(
        o,
        "            return {status} '{{\"error\":\"{error}\",\"port\":$pinacle_target_port}}\\n';"
    )?;
    writeln!(o, "        }}")
}

/// An internal location answering 404 for a port the pod does not expose.
fn write_rejection(o: &mut String, ext: &str, content_type: &str, body: &str) -> std::fmt::Result {
    writeln!(o, "        location = /__pinacle/port-not-exposed.{ext} {{")?;
    writeln!(o, "            internal;")?;
    writeln!(o, "            default_type {content_type};")?;
    writeln!(
        o,
        "            add_header {MARKER_HEADER} port-not-exposed always;"
    )?;
    writeln!(o, "            return 404 '{body}\\n';")?;
    writeln!(o, "        }}")
}
