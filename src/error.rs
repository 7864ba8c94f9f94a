//! The library's one error type. Every variant names the value and the rule it broke, so that a
//! message can be shown to a user as is.

use std::path::PathBuf;

/// Errors of the llada library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A run setting (sampler, scorer, trainer, CLI flag) violates a rule.
    #[error("invalid setting {name}={value}: {rule}")]
    InvalidSetting {
        name: String,
        value: String,
        rule: String,
    },

    /// A prompt and its answer do not fit the model's context (an invalid `gen_length` for this
    /// prompt; its own variant so that the server can answer 413).
    #[error("invalid setting gen_length={answer}: prompt ({prompt} tokens) + answer ({answer}) = {} exceeds the model's max_sequence_length={max}", *.prompt as u128 + *.answer as u128)]
    TooLong {
        prompt: usize,
        answer: usize,
        max: usize,
    },

    /// A key of `config.json` has a value this engine does not support or that is inconsistent.
    #[error("config.json: {key}={value}: {reason}")]
    Config {
        key: String,
        value: String,
        reason: String,
    },

    /// The checkpoint names an architecture this engine does not implement.
    #[error("unsupported architecture {found:?} (supported: {supported})")]
    UnsupportedArchitecture { found: String, supported: String },

    /// A tensor the model needs is not in the checkpoint.
    #[error("missing tensor {name} (looked in {path})")]
    MissingTensor { name: String, path: PathBuf },

    /// A tensor of the checkpoint has the wrong shape.
    #[error("tensor {name} in {path}: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A checkpoint file is unreadable, truncated or corrupt.
    #[error("checkpoint file {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config, cases, data) could not be parsed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A line of a JSONL input file is malformed.
    #[error("{path}:{line}: {reason}")]
    DataLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    /// The tokenizer failed (loading, encoding, decoding, training).
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    Template(#[from] minijinja::Error),

    /// A tensor operation failed.
    #[error("tensor op: {0}")]
    Tensor(#[from] candle_core::Error),

    /// The operation was cancelled by its caller (an `on_step` callback asked to stop).
    #[error("cancelled")]
    Cancelled,

    /// A checkpoint writer's output folder is not one it may write (a file, a folder of other
    /// files without force, a name-less path).
    #[error("output folder {path}: {reason}")]
    OutputFolder { path: PathBuf, reason: String },

    /// Training diverged: the loss, the gradient norm or the updated weights are not finite.
    #[error("training diverged at step {step}: {what} is {value} ({advice}); nothing was saved at this step, the last checkpoint is kept")]
    NonFinite {
        step: usize,
        what: String,
        value: String,
        advice: String,
    },
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidSetting`].
    pub fn setting(name: &str, value: impl std::fmt::Display, rule: impl Into<String>) -> Self {
        Error::InvalidSetting {
            name: name.to_string(),
            value: value.to_string(),
            rule: rule.into(),
        }
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(key: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::Config {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Reads a whole file, naming the file on failure. For input the user names that may be a pipe
/// (data files, `ppl` texts, `<(…)`): no file-type check and no size cap. Files of a checkpoint or
/// a run folder go through [`read_regular_file`] instead.
pub fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Largest JSON file [`read_json`] reads (config.json, tokenizer_config.json, the shard index,
/// trainer_state.json, dataset headers): 64 MiB, far above any real one (kilobytes).
pub const JSON_FILE_LIMIT: u64 = 64 << 20;

/// Largest `tokenizer.json` a tokenizer is loaded from: 256 MiB (large vocabularies take tens of
/// MiB).
pub const TOKENIZER_FILE_LIMIT: u64 = 256 << 20;

/// Reads a whole file of a checkpoint or run folder: it must be a regular file (symlinks to one are
/// followed; a FIFO, a device, a socket or a folder is refused before anything blocks or grows) of
/// at most `limit` bytes. The type is checked before opening (opening a FIFO blocks until a writer
/// comes; opening a device may act on it), and again on what was opened, which is opened
/// non-blocking so that a FIFO swapped in between cannot hang the caller; the read stops at the
/// limit whatever the file's size claimed.
pub fn read_regular_file(path: &std::path::Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    check_regular_file(path)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    let too_big = |size: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!(
            "is {size} bytes, larger than the {limit} bytes ({} MiB) llada reads for this file",
            limit >> 20
        ),
    };
    if meta.len() > limit {
        return Err(too_big(meta.len().to_string()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_big("more than that".into()));
    }
    Ok(bytes)
}

/// A file llada reads whole or maps must be a regular file (symlinks to one are followed): not a
/// FIFO, a device, a socket or a folder.
pub fn check_regular_file(path: &std::path::Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) => Err(not_regular(path, &m)),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The error for a path that is not a regular file, naming what it is.
pub fn not_regular(path: &std::path::Path, m: &std::fs::Metadata) -> Error {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        "a folder"
    } else {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_fifo() {
                "a FIFO (named pipe)"
            } else if ft.is_char_device() || ft.is_block_device() {
                "a device"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            }
        }
        #[cfg(not(unix))]
        {
            "not a regular file"
        }
    };
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("is {kind}; checkpoint files must be regular files"),
    }
}

/// Reads and parses a JSON file of a checkpoint or run folder (a regular file of at most
/// [`JSON_FILE_LIMIT`] bytes, see [`read_regular_file`]), naming the file on failure.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let bytes = read_regular_file(path, JSON_FILE_LIMIT)?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses every non-blank line of a JSONL file into `T`, with its 1-based line number; a line that
/// does not parse is an error naming the file, the line and what was expected.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    expected: &str,
) -> Result<Vec<(usize, T)>> {
    let text = read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(line).map_err(|e| Error::DataLine {
            path: path.to_path_buf(),
            line: i + 1,
            reason: format!("{e} (expected {expected})"),
        })?;
        out.push((i + 1, v));
    }
    Ok(out)
}
