//! Shared by the integration tests that run on real models.

use std::path::PathBuf;

/// The folder `scripts/setup.sh` installed `name` in (under `$CASCADE_MODELS`
/// or the repository's `models/`); fails the test if it is not there.
pub fn model_dir(name: &str) -> PathBuf {
    let models = std::env::var_os("CASCADE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let dir = models.join(name);
    assert!(
        dir.join(".complete").exists(),
        "{name} missing at {}: run scripts/setup.sh",
        dir.display()
    );
    dir
}
