//! Node-to-node channels (issue 10): the X509-SVID verifier. Not wired into the agent yet.

pub mod verifier;
