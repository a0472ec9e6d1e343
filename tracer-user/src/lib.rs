//! tracer: an eBPF request tracer. The modules follow the data path:
//! probes -> events -> conn -> protocols -> spans -> export; `agent` wires them together and
//! `cli` is the command line. `relay` is `tracer collect`, the span relay that links hops
//! across hosts when no trace header did.

pub mod agent;
pub mod cli;
pub mod conn;
pub mod context;
pub mod events;
pub mod export;
pub mod governor;
pub mod metrics;
pub mod probes;
pub mod protocols;
pub mod relay;
pub mod spans;
pub mod yielding;
