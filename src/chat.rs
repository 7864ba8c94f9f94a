//! The chat template of `tokenizer_config.json`, rendered with minijinja as Hugging Face renders
//! it with Jinja2: `trim_blocks` and `lstrip_blocks` on, Python string methods available
//! (`pycompat`), `raise_exception` defined, special tokens (`bos_token`, `eos_token`, …) in scope.
//!
//! A template comes from a checkpoint, which may be hostile or broken, so rendering is bounded:
//! at most [`TEMPLATE_FUEL`] template instructions (a nested loop runs out of fuel instead of
//! hanging) and at most [`MAX_RENDERED_BYTES`] of output (written through a counting writer, so
//! the text is refused before it is built, not after).

use std::collections::BTreeMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
}

const TEMPLATE_NAME: &str = "chat";

/// Template instructions one render may execute (a real chat template uses a few dozen per
/// message).
pub const TEMPLATE_FUEL: u64 = 20_000_000;
/// Longest rendered prompt, in bytes.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

/// A writer that refuses to grow past `max` bytes.
struct Bounded {
    out: Vec<u8>,
    max: usize,
    overflowed: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.max {
            self.overflowed = true;
            return Err(std::io::Error::other(format!(
                "the rendered prompt exceeds {} bytes",
                self.max
            )));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    special: BTreeMap<String, String>,
    source: String,
    max_bytes: usize,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`. `special` maps variable names (`bos_token`, `eos_token`, …) to the
    /// token strings the template may use.
    pub fn new(source: String, special: BTreeMap<String, String>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?;
        env.set_syntax(syntax);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.clone())?;
        Ok(ChatTemplate {
            env,
            special,
            source,
            max_bytes: MAX_RENDERED_BYTES,
        })
    }

    /// The same template with other bounds: `fuel` template instructions and `max_bytes` of
    /// output per render.
    pub fn with_limits(mut self, fuel: u64, max_bytes: usize) -> Self {
        self.env.set_fuel(Some(fuel));
        self.max_bytes = max_bytes;
        self
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` into the prompt text (not tokenised).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(TEMPLATE_NAME)?;
        let mut ctx: BTreeMap<String, Value> = self
            .special
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        ctx.insert(
            "messages".into(),
            Value::from(minijinja::value::Serde(messages)),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let mut w = Bounded {
            out: Vec::new(),
            max: self.max_bytes,
            overflowed: false,
        };
        if let Err(e) = tmpl.render_captured_to(ctx, &mut w) {
            if w.overflowed {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "the rendered prompt exceeds {} bytes (the chat template's output limit)",
                        self.max_bytes
                    ),
                )
                .into());
            }
            return Err(e.into());
        }
        String::from_utf8(w.out).map_err(|_| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "the rendered prompt is not UTF-8",
            )
            .into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLADA: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}";

    fn llada() -> ChatTemplate {
        let mut special = BTreeMap::new();
        special.insert("bos_token".into(), "<|startoftext|>".into());
        ChatTemplate::new(LLADA.into(), special).unwrap()
    }

    #[test]
    fn reference_example_hi() {
        let s = llada().render(&[Message::user("Hi")], true).unwrap();
        assert_eq!(s, "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    }

    #[test]
    fn trims_content_and_always_appends_header() {
        let t = llada();
        let msgs = [
            Message::user("a"),
            Message::assistant("b"),
            Message::user("  c \n"),
        ];
        let s = t.render(&msgs, false).unwrap();
        assert!(s.contains("\n\nc<|eot_id|>"));
        assert!(s.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
        assert_eq!(s.matches("<|startoftext|>").count(), 1);
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}".into(),
            BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(t.render(&[Message::user(" x ")], true).unwrap(), "X");
        let err = t.render(&[Message::assistant("x")], true).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    /// A template that loops without end runs out of fuel (before: it hung `generate --chat`
    /// and the server's handler threads).
    #[test]
    fn a_nested_loop_runs_out_of_fuel() {
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x"
                .into(),
            BTreeMap::new(),
        )
        .unwrap()
        .with_limits(200_000, MAX_RENDERED_BYTES);
        let err = t.render(&[Message::user("x")], true).unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
        // the default bound stops it too, and a normal template fits the default easily
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x"
                .into(),
            BTreeMap::new(),
        )
        .unwrap();
        assert!(t
            .render(&[Message::user("x")], true)
            .unwrap_err()
            .to_string()
            .contains("fuel"));
        let msgs: Vec<Message> = (0..2000).map(|i| Message::user(format!("m{i}"))).collect();
        assert!(llada().render(&msgs, true).is_ok());
    }

    /// Output past the limit is refused while it is written (before: a template producing 10 GB
    /// aborted the process on out-of-memory).
    #[test]
    fn output_past_the_limit_is_refused() {
        let t = ChatTemplate::new(
            "{% for a in range(1000) %}{{ 'y' * 100000 }}{% endfor %}".into(),
            BTreeMap::new(),
        )
        .unwrap()
        .with_limits(TEMPLATE_FUEL, 1 << 20);
        let err = t.render(&[Message::user("x")], true).unwrap_err();
        assert!(err.to_string().contains("exceeds 1048576 bytes"), "{err}");
        // the default limit: 100 MB of output is refused
        let t = ChatTemplate::new(
            "{% for a in range(1000) %}{{ 'y' * 100000 }}{% endfor %}".into(),
            BTreeMap::new(),
        )
        .unwrap();
        let err = t.render(&[Message::user("x")], true).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
    }
}
