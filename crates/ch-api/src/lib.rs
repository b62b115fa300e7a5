//! Cloud Hypervisor's REST API as nfvisor speaks it (release v53.0's
//! `cloud-hypervisor.yaml`): the HTTP/1.1 codec of the API socket
//! (`http`: requests with SCM_RIGHTS descriptors, bounded) and Cloud
//! Hypervisor's VM configuration mapped onto nfvisor's one `VmConfig`
//! (`config`). The server that routes requests to a VM is the binary's
//! (`src/api_server.rs`); these parts have no VM inside, and the fuzz
//! targets reach them.

pub mod config;
pub mod http;
