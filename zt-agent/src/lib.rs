pub mod state;
pub mod admin;
pub mod events;
pub mod loader;
pub mod metrics;
pub mod net;
pub mod pins;
pub mod sync;
