//! weir's control plane (being assembled).

pub mod model;
pub mod routing;
pub mod validate;
