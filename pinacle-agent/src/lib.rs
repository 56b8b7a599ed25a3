//! The reverse-tunnel agent and the protocol it shares with the gateway (`pinacle-ingress`).
//!
//! An agent on a pod server dials out to each gateway and says who it is with one HTTP/1.1
//! request, `GET /pinacle-agent/v1` with `Upgrade: pinacle-agent-h2`, `X-Pinacle-Server: <server
//! id>` and `Authorization: Bearer <secret>`. The gateway answers `101 Switching Protocols` (or
//! 401 and closes), and from then on the connection is HTTP/2 (the `h2` crate) with the roles
//! reversed: the gateway is the client, the agent the server. Each stream is a `CONNECT
//! 127.0.0.1:<port>` (RFC 9113 §8.5): the agent dials `--upstream-host:<port>` if the port is
//! in `--allow-ports` and then carries bytes both ways, with HTTP/2 flow control bounding what
//! is buffered. HTTP requests, server-sent events, WebSockets and large uploads are all just
//! bytes on such a stream; the gateway's engines speak HTTP/1.1 to the pod's nginx over it as
//! they would over TCP.

pub mod agent;
pub mod protocol;
