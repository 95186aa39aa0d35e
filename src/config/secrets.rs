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

/// A secret as written in the file (S3 keys, a Redis URL that may hold a password). Its
/// `Debug` shows nothing, and it serializes (for the reload diff, [`super::settings`]) as a
/// [`mask`]: the diff can tell that it changed, never what it is.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value, for the code that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The value, taken.
    pub fn into_inner(self) -> String {
        self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&mask(&self.0))
    }
}

/// The start of a masked secret in the settings tree.
pub(super) const MASK: &str = "\u{1}secret:";

/// A secret's stand-in in the settings tree: a hash under a key drawn at random once per
/// process, so two values compare equal exactly when the secrets do (but for collisions of a
/// 64-bit hash), and nothing printed or kept outside the process can be matched against a
/// guess. The diff never prints it.
pub(super) fn mask(value: &str) -> String {
    use std::hash::BuildHasher;
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let hash = KEY
        .get_or_init(std::collections::hash_map::RandomState::new)
        .hash_one(value);
    format!("{MASK}{hash:016x}")
}
