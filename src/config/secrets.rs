//! Secrets (S3 credentials) from the config value, a file, or an environment variable.

use std::path::Path;

/// Resolves a secret from the config value, a file, or an environment variable, in that order.
/// A file that group or other may read is refused (as Garage does in `secrets.rs`).
pub(super) fn secret(
    value: Option<&str>,
    file: Option<&Path>,
    env: &str,
) -> Result<String, String> {
    if let Some(v) = value {
        return Ok(v.to_owned());
    }
    if let Some(file) = file {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "{} may be read by group or others; run `chmod 600 {}`",
                file.display(),
                file.display()
            ));
        }
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        return Ok(text.trim().to_owned());
    }
    std::env::var(env).map_err(|_| format!("missing: set it, its `_file` variant, or {env}"))
}
