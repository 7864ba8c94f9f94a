//! Finding a model: a folder path, a Hugging Face hub id already in the local hub cache, or the
//! default model (`LLADA_MODEL`, else the small model shipped in the repository).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variable naming the default model (a folder or a hub id).
pub const MODEL_ENV: &str = "LLADA_MODEL";

/// The small model shipped with the source tree (`models/llada-tiny-kjv`).
pub fn shipped_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llada-tiny-kjv")
}

/// The Hugging Face hub cache folder: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or
/// `~/.cache/huggingface/hub`.
pub fn hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".cache/huggingface/hub"))
}

/// Whether `s` looks like a hub id (`owner/name`, no other path syntax).
fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p != &"."
                && p != &".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The snapshot folder of hub id `id` in the local cache (`models--owner--name/snapshots/REV`,
/// REV from `refs/main`, else the only or newest snapshot).
pub fn hub_snapshot(id: &str) -> Result<PathBuf> {
    let cache = hub_cache()
        .ok_or_else(|| Error::setting("model", id, "no Hugging Face cache folder (set HF_HOME)"))?;
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let not_cached = || {
        Error::setting(
            "model",
            id,
            format!(
                "not found in the local Hugging Face cache ({}); llada does not download: fetch it first, e.g. `huggingface-cli download {id}`, or pass a folder",
                repo.display()
            ),
        )
    };
    if !repo.is_dir() {
        return Err(not_cached());
    }
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let p = snapshots.join(rev.trim());
        if p.is_dir() {
            return Ok(p);
        }
    }
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .map_err(|_| not_cached())?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, p)| p).ok_or_else(not_cached)
}

/// Resolves a model argument: `None` → `$LLADA_MODEL` or the shipped model; an existing path →
/// that folder; `owner/name` → its snapshot in the local hub cache.
pub fn resolve(spec: Option<&str>) -> Result<PathBuf> {
    let spec: String = match spec {
        Some(s) => s.to_string(),
        None => match std::env::var(MODEL_ENV) {
            Ok(s) if !s.is_empty() => s,
            _ => {
                let p = shipped_model();
                if p.join("config.json").exists() {
                    return Ok(p);
                }
                return Err(Error::setting(
                    "model",
                    "none given",
                    format!(
                        "pass a checkpoint folder or hub id, or set {MODEL_ENV} (the shipped model {} is absent)",
                        p.display()
                    ),
                ));
            }
        },
    };
    let path = PathBuf::from(&spec);
    if path.exists() {
        return Ok(path);
    }
    if is_hub_id(&spec) {
        return hub_snapshot(&spec);
    }
    Err(Error::setting(
        "model",
        &spec,
        "no such folder, and not a hub id of the form owner/name",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(is_hub_id("GSAI-ML/LLaDA-8B-Instruct"));
        assert!(!is_hub_id("./x"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("plain"));
    }
}
