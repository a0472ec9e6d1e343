//! tracer: an eBPF request tracer. The modules follow the data path:
//! probes -> events -> conn -> protocols -> spans -> export.

pub mod conn;
pub mod events;
pub mod export;
pub mod probes;
pub mod protocols;
pub mod spans;
