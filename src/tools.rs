//! The operator's tools that ship in the same binary but are not the proxy: the host audit
//! (`doctor`), the handshake-storm and shopper load generator (`storm`), and the demo origins
//! (`demo`). Behind the default `tools` feature, with clap: a library user who only embeds the
//! proxy builds with `default-features = false` and carries neither.

pub mod demo;
pub mod doctor;
pub mod storm;
