//! The one integration test binary (see ARCHITECTURE.md, "Tests").

mod doctor;
