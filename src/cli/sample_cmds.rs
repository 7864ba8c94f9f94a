//! `llada generate`, `llada chat`, `llada infill`.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use llada::sampler::{
    self, CacheMode, Preset, PromptBatch, PromptRules, Remasking, SamplerConfig, SamplerSettings,
    StepEvent,
};
use llada::{Checkpoint, Message, Rng};

use super::{parse_ids, print_json, ModelArg, RuntimeArgs};

/// Sampler flags shared by generate, chat, infill, eval-chat and bench: a preset (`--sampler`)
/// and flags over it.
#[derive(Args, Debug, Clone, Default)]
pub struct SamplerArgs {
    /// Defaults the other flags apply over: fast (threshold 0.9, blocks of 32, dual cache, early
    /// stop; LLaDA2: its own sampler with the block cache) or reference (the official sampler's
    /// defaults exactly: one token per step, no cache) [default: fast; bench and eval-chat:
    /// reference].
    #[arg(long = "sampler", value_enum, value_name = "PRESET")]
    pub preset: Option<Preset>,
    /// Answer length in tokens [default: 128].
    #[arg(long)]
    pub gen_length: Option<usize>,
    /// Denoising steps over all blocks [default: the answer length, one token per step].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Semi-autoregressive block length [default: 32 (--sampler fast; chat's reference too),
    /// generate's reference 128; one block over the answer when it does not divide its length;
    /// infill: one block over the masked region].
    #[arg(long)]
    pub block_length: Option<usize>,
    /// Confidence scoring: low_confidence or random (LLaDA), maskgit_plus, topk_margin or entropy
    /// (Dream's) [default: low_confidence].
    #[arg(long, value_enum, hide_possible_values = true)]
    pub remasking: Option<Remasking>,
    /// Gumbel-max temperature; 0 = greedy [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Classifier-free guidance scale; 0 = off [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub cfg_scale: Option<f64>,
    /// Never generate EOS (its logit is set to −∞).
    #[arg(long)]
    pub logits_eos_inf: bool,
    /// Give EOS/EOT predictions confidence 0 (the reference's behaviour).
    #[arg(long)]
    pub confidence_eos_eot_inf: bool,
    /// Fast-dLLM: commit every prediction with confidence ≥ τ (at least one per step)
    /// [default: 0.9 with --sampler fast (LLaDA2: 0.95), off with reference].
    #[arg(long, allow_negative_numbers = true)]
    pub threshold: Option<f64>,
    /// Fast-dLLM factor rule: commit the longest prefix of ranks n with (n+1)(1−c_n) ≤ f.
    #[arg(long, allow_negative_numbers = true)]
    pub factor: Option<f64>,
    /// Key/value cache between the steps of a block: none, prefix or dual (Fast-dLLM)
    /// [default: dual with --sampler fast (infill: none), none with reference].
    #[arg(long, value_enum, hide_possible_values = true)]
    pub cache: Option<CacheMode>,
    /// Stop as soon as the answer is final (an EOS/EOT committed with nothing masked before it);
    /// the decoded answer is unchanged, the rest becomes EOS padding [default: on with
    /// --sampler fast, off with reference and infill].
    #[arg(long)]
    pub early_stop: bool,
    /// Dream's sampler (`diffusion_generate`): origin, maskgit_plus, topk_margin or entropy;
    /// one block over the answer, Dream's schedule, no cache unless asked.
    #[arg(long, value_enum, hide_possible_values = true)]
    pub alg: Option<sampler::settings::Alg>,
    /// Dream's alg_temp: > 0 draws the committed positions from softmax(confidence / alg_temp).
    #[arg(long, allow_negative_numbers = true)]
    pub alg_temp: Option<f64>,
    /// Dream's eps: the last timestep of its schedule [default with --alg: 0.001].
    #[arg(long, allow_negative_numbers = true)]
    pub eps: Option<f64>,
    /// Nucleus filter: keep the most probable tokens through cumulative probability top_p.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Keep only the top_k most probable tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// LLaDA2 (block diffusion): return as soon as the answer up to its first EOS is decoded.
    #[arg(long)]
    pub eos_early_stop: bool,
    /// LLaDA2: steps per block are at most gen_length / minimal_topk [default: 1].
    #[arg(long)]
    pub minimal_topk: Option<usize>,
    /// LLaDA2.1's token editing: overwrite a decoded token whose prediction differs with
    /// probability above this [default 0.9]; giving any LLaDA2.1 flag selects its sampler.
    #[arg(long, allow_negative_numbers = true)]
    pub editing_threshold: Option<f64>,
    /// LLaDA2.1: steps a block may take after its last mask is decoded [default: 16].
    #[arg(long)]
    pub max_post_steps: Option<usize>,
    /// LLaDA2.1: tokens a step decodes when too few pass --threshold [default: 1].
    #[arg(long)]
    pub num_to_transfer: Option<usize>,
    /// Random seed (temperature sampling, random remasking).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplerArgs {
    /// The flags given, as the library's raw settings (a flag not given is `None`).
    pub fn settings(&self) -> SamplerSettings {
        SamplerSettings {
            gen_length: self.gen_length,
            steps: self.steps,
            block_length: self.block_length,
            remasking: self.remasking,
            temperature: self.temperature,
            cfg_scale: self.cfg_scale,
            logits_eos_inf: self.logits_eos_inf.then_some(true),
            confidence_eos_eot_inf: self.confidence_eos_eot_inf.then_some(true),
            threshold: self.threshold.map(Some),
            factor: self.factor,
            cache: self.cache,
            early_stop: self.early_stop.then_some(true),
            alg: self.alg,
            alg_temp: self.alg_temp,
            eps: self.eps,
            top_p: self.top_p,
            top_k: self.top_k,
            eos_early_stop: self.eos_early_stop.then_some(true),
            minimal_topk: self.minimal_topk,
            editing_threshold: self.editing_threshold,
            max_post_steps: self.max_post_steps,
            num_to_transfer: self.num_to_transfer,
        }
    }

    /// The preset asked for, else `default`.
    pub fn preset_or(&self, default: Preset) -> Preset {
        self.preset.unwrap_or(default)
    }

    /// The flags over the preset (else `default`) applied to a command's reference defaults,
    /// without the layout checks ([`SamplerSettings::merge`]); `cache`: whether the command can
    /// use the fast preset's cache and early stop.
    pub fn apply(
        &self,
        reference: SamplerConfig,
        default: Preset,
        cache: bool,
    ) -> Result<SamplerConfig> {
        let base = self.preset_or(default).apply(reference, cache);
        Ok(self.settings().merge(&base)?)
    }

    /// The flags over the preset (else `default`) applied to a command's reference defaults,
    /// checked ([`SamplerSettings::resolve`]).
    pub fn config(&self, reference: SamplerConfig, default: Preset) -> Result<SamplerConfig> {
        let base = self.preset_or(default).apply(reference, true);
        Ok(self.settings().resolve(&base)?)
    }
}

/// Live rendering of the denoising canvas (`--show-steps`).
pub struct StepView<'a> {
    ck: &'a Checkpoint,
    tty: bool,
    started: Instant,
}

impl<'a> StepView<'a> {
    pub fn new(ck: &'a Checkpoint) -> Self {
        StepView {
            ck,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }

    fn piece(&self, id: u32) -> String {
        match &self.ck.tokenizer {
            Some(t) => t
                .decode(&[id], false)
                .unwrap_or_default()
                .replace('\n', "⏎"),
            None => format!("[{id}]"),
        }
    }

    /// An `on_step` callback that draws every step when `show`.
    pub fn callback<'s>(
        &'s mut self,
        show: bool,
    ) -> impl FnMut(&StepEvent) -> ControlFlow<()> + use<'s, 'a> {
        move |e: &StepEvent| {
            if show {
                self.show(e);
            }
            ControlFlow::Continue(())
        }
    }

    /// Draws the canvas of row 0: masked positions as `░`, this step's commits highlighted.
    pub fn show(&mut self, e: &StepEvent) {
        let row = e.canvas[0];
        let fresh: Vec<usize> = e.committed[0].iter().map(|c| c.index).collect();
        let mut line = String::new();
        if self.tty {
            for (i, &t) in row.iter().enumerate() {
                let s = if t == e.mask_id {
                    "░".to_string()
                } else {
                    self.piece(t)
                };
                if fresh.contains(&i) {
                    line.push_str(&format!("\x1b[1;32m{s}\x1b[0m"));
                } else if t == e.mask_id {
                    line.push_str(&format!("\x1b[2m{s}\x1b[0m"));
                } else {
                    line.push_str(&s);
                }
            }
        } else {
            let pieces: Vec<String> = row
                .iter()
                .map(|&t| {
                    if t == e.mask_id {
                        "░".to_string()
                    } else {
                        self.piece(t)
                    }
                })
                .collect();
            line = compact_canvas(&pieces);
        }
        let masked = row.iter().filter(|&&t| t == e.mask_id).count();
        let header = format!(
            "step {}/{} · block {} · {} masked · nfe {} · {:.1}s",
            e.step + 1,
            e.total_steps,
            e.block,
            masked,
            e.nfe,
            self.started.elapsed().as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\x1b[2J\x1b[H{header}\n\n{line}\n");
        } else {
            let _ = writeln!(err, "{header}: {line}");
        }
        let _ = err.flush();
    }
}

/// A canvas as one short line for logs (not a terminal): a run of the same mask or special token
/// (`<|eot_id|>` padding) is written once with its count, `░×12`, `<|eot_id|>×20`.
pub fn compact_canvas(pieces: &[String]) -> String {
    let runs_of = |p: &str| p == "░" || (p.starts_with("<|") && p.ends_with("|>"));
    let mut out = String::new();
    let mut i = 0;
    while i < pieces.len() {
        let p = &pieces[i];
        let mut j = i + 1;
        if runs_of(p) {
            while j < pieces.len() && pieces[j] == *p {
                j += 1;
            }
        }
        out.push_str(p);
        if j - i > 1 {
            out.push_str(&format!("×{}", j - i));
        }
        i = j;
    }
    out
}

/// Prints an answer on stdout as it becomes final (the committed prefix grows left to right, as
/// the server streams it), when on; [`Streamer::finish`] prints the rest.
pub struct Streamer<'a> {
    tok: Option<&'a llada::Tokenizer>,
    sent: String,
}

impl<'a> Streamer<'a> {
    /// Streams when `on` and there is a tokenizer.
    pub fn new(tok: Option<&'a llada::Tokenizer>, on: bool) -> Self {
        Streamer {
            tok: tok.filter(|_| on),
            sent: String::new(),
        }
    }

    /// Whether it streams.
    pub fn on(&self) -> bool {
        self.tok.is_some()
    }

    /// Prints what row 0's answer gained since the last step.
    pub fn step(&mut self, e: &StepEvent) {
        let Some(tok) = self.tok else { return };
        let Some(prefix) = tok.committed_prefix(e.canvas[0]) else {
            return;
        };
        if prefix.len() > self.sent.len() && prefix.starts_with(&self.sent) {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{}", &prefix[self.sent.len()..]);
            let _ = out.flush();
            self.sent = prefix;
        }
    }

    /// Prints the rest of the final `text` and ends the line; without streaming, the whole line.
    pub fn finish(&mut self, text: &str) {
        match text.strip_prefix(self.sent.as_str()) {
            Some(rest) if self.on() => println!("{rest}"),
            // (a streamed prefix the final text does not start with: the answer was edited)
            _ if self.on() => println!("\n{text}"),
            _ => println!("{text}"),
        }
        self.sent.clear();
    }
}

/// Tokens of each answer before its first EOS/EOT (the answer; the rest of the canvas is padding).
fn answer_tokens(ids: &[Vec<u32>], sp: &llada::SpecialTokens) -> usize {
    ids.iter()
        .map(|r| sp.answer_end(r).unwrap_or(r.len()))
        .sum()
}

/// `n` and `word` with an `s` unless `n` is 1.
fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// The one-line summary of a generation on stderr: the answer's own tokens and their rate (the
/// EOS padding after the answer is not output), the canvas, the forward evaluations.
fn summary(answer: usize, canvas: usize, rows: usize, nfe: usize, seconds: f64) -> String {
    format!(
        "[{} in {seconds:.2}s · {:.1} answer tokens/s · canvas {canvas}{} · {}]",
        plural(answer, "answer token"),
        answer as f64 / seconds,
        if rows > 1 {
            format!(" × {rows}")
        } else {
            String::new()
        },
        plural(nfe, "forward evaluation"),
    )
}

/// Says on stderr why an answer is empty (instead of printing nothing), with a hint.
fn explain_empty(tok: &llada::Tokenizer, ids: &[u32], chat: bool) {
    if let Some(why) = tok.empty_answer_reason(ids) {
        let hint = if !chat && tok.chat_template().is_some() {
            "; a chat (instruction-tuned) model answers with --chat, and --logits-eos-inf forbids EOS"
        } else {
            "; --logits-eos-inf forbids EOS"
        };
        eprintln!("(empty answer: {why}{hint})");
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Prompt text (repeat for a batch, left-padded).
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Vec<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long)]
    pub prompt_ids: Option<String>,
    /// Wrap the prompt in the chat template as one user message.
    #[arg(long)]
    pub chat: bool,
    /// Sample left to right, one token per forward (for an autoregressive twin, whose config
    /// says causal_attention: true); stops after EOS/EOT.
    #[arg(long)]
    pub ar: bool,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Redraw the canvas live after every step.
    #[arg(long)]
    pub show_steps: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    if a.ar {
        return generate_ar(a);
    }
    let ck = a.rt.load(&a.model.resolve()?)?;
    let cfg = a
        .sampler
        .config(SamplerConfig::for_model(&ck.config), Preset::Fast)?;
    let prompts: Vec<Vec<u32>> = if let Some(ids) = &a.prompt_ids {
        vec![parse_ids(ids, "--prompt-ids")?]
    } else {
        if a.prompt.is_empty() {
            bail!("give a prompt: --prompt TEXT or --prompt-ids 1,2,3");
        }
        let tok = ck.tokenizer()?;
        a.prompt
            .iter()
            .map(|p| {
                if a.chat {
                    tok.encode_chat(&[Message::user(p.as_str())])
                } else {
                    tok.encode(p)
                }
            })
            .collect::<llada::Result<_>>()?
    };
    let rules = PromptRules::for_model(&ck.config, ck.special.mask);
    for p in &prompts {
        rules.check(p, cfg.gen_length)?;
    }
    let batch = PromptBatch::left_padded(&prompts, ck.special.pad);
    let mut rng = Rng::new(a.sampler.seed);
    let mut view = StepView::new(&ck);
    // stream the answer to a terminal as it becomes final (LLaDA2.1 may edit committed tokens)
    let editing = cfg
        .block_diffusion
        .as_ref()
        .is_some_and(|b| b.editing.is_some());
    let stream = !a.json
        && !a.show_steps
        && !editing
        && prompts.len() == 1
        && std::io::stdout().is_terminal();
    let mut streamer = Streamer::new(ck.tokenizer.as_ref(), stream);
    let mut on_step = |e: &StepEvent| {
        if a.show_steps {
            view.show(e);
        }
        streamer.step(e);
        ControlFlow::Continue(())
    };
    let t0 = Instant::now();
    let mut m = ck.model.predictor();
    let g = sampler::generate(&mut m, &batch, &cfg, &ck.special, &mut rng, &mut on_step)?;
    let seconds = t0.elapsed().as_secs_f64();
    let texts: Vec<String> = match &ck.tokenizer {
        Some(t) => g
            .generated_ids
            .iter()
            .map(|ids| t.decode_answer(ids))
            .collect::<llada::Result<_>>()?,
        None => vec![String::new(); g.generated_ids.len()],
    };
    let answer = answer_tokens(&g.generated_ids, &ck.special);
    let canvas = cfg.gen_length * g.generated_ids.len();
    if a.json {
        let single = g.generated_ids.len() == 1;
        let (ids, text) = if single {
            (
                serde_json::json!(g.generated_ids[0]),
                serde_json::json!(texts[0]),
            )
        } else {
            (serde_json::json!(g.generated_ids), serde_json::json!(texts))
        };
        return print_json(&serde_json::json!({
            "generated_ids": ids, "text": text, "nfe": g.nfe, "steps": g.steps,
            "seconds": seconds, "answer_tokens": answer, "canvas_tokens": canvas,
            "tokens_per_s": answer as f64 / seconds,
            "canvas_tokens_per_s": canvas as f64 / seconds,
        }));
    }
    for (i, t) in texts.iter().enumerate() {
        match &ck.tokenizer {
            Some(tok) => {
                streamer.finish(t);
                explain_empty(tok, &g.generated_ids[i], a.chat);
            }
            None => println!("{:?}", g.generated_ids[i]),
        }
    }
    eprintln!(
        "{}",
        summary(
            answer,
            cfg.gen_length,
            g.generated_ids.len(),
            g.nfe,
            seconds
        )
    );
    Ok(())
}

fn generate_ar(a: GenerateArgs) -> Result<()> {
    let cfg = a
        .sampler
        .apply(SamplerConfig::default(), Preset::Reference, false)?;
    let ck = a.rt.load(&a.model.resolve()?)?;
    if !ck.config.causal {
        eprintln!("note: {} is a bidirectional mask predictor; --ar reads its next-token predictions anyway", ck.dir.display());
    }
    let tok = ck.tokenizer()?;
    let prompt = match (&a.prompt_ids, a.prompt.first()) {
        (Some(ids), _) => parse_ids(ids, "--prompt-ids")?,
        (None, Some(p)) if a.chat => tok.encode_chat(&[Message::user(p.as_str())])?,
        (None, Some(p)) => tok.encode(p)?,
        (None, None) => bail!("give a prompt: --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let t0 = Instant::now();
    let mut m = ck.model.predictor();
    let mut rng = Rng::new(a.sampler.seed);
    let mut view = StepView::new(&ck);
    let mut on_step = view.callback(a.show_steps);
    let g = sampler::ar::generate_ar(
        &mut m,
        &prompt,
        cfg.gen_length,
        cfg.temperature,
        true,
        &ck.special,
        &mut rng,
        &mut on_step,
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    let text = tok.decode_answer(&g.generated_ids[0])?;
    if a.json {
        return print_json(&serde_json::json!({
            "generated_ids": g.generated_ids[0], "text": text, "nfe": g.nfe, "seconds": seconds,
        }));
    }
    println!("{text}");
    eprintln!(
        "[{} tokens left to right in {seconds:.2}s]",
        g.generated_ids[0].len()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// A system message that starts the conversation (kept by /reset).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Redraw the canvas live after every step.
    #[arg(long)]
    pub show_steps: bool,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

/// chat.py's settings: gen 128, steps 128, block 32 (the reference preset of `chat`).
fn chat_defaults() -> SamplerConfig {
    SamplerConfig {
        gen_length: 128,
        steps: 128,
        block_length: 32,
        ..Default::default()
    }
}

/// The console commands of `llada chat`.
const CHAT_COMMANDS: &str =
    "/help lists these commands, /reset clears the history (the --system message stays), /history shows it, /settings the sampler, /exit or /quit (or Ctrl-D) quits";

pub fn chat(a: ChatArgs) -> Result<()> {
    let ck = a.rt.load(&a.model.resolve()?)?;
    let base = if ck.config.architecture == llada::model::Architecture::Llada2 {
        SamplerConfig::for_model(&ck.config)
    } else {
        chat_defaults()
    };
    let cfg = a.sampler.config(base, Preset::Fast)?;
    let tok = ck.tokenizer()?;
    if tok.chat_template().is_none() {
        bail!(
            "{} has no chat template in tokenizer_config.json",
            ck.dir.display()
        );
    }
    let mut rng = Rng::new(a.sampler.seed);
    let start: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let mut history = start.clone();
    let interactive = std::io::stdin().is_terminal();
    let editing = cfg
        .block_diffusion
        .as_ref()
        .is_some_and(|b| b.editing.is_some());
    let stream = !a.show_steps && !editing && std::io::stdout().is_terminal();
    if interactive {
        eprintln!("llada chat · {} · {}", ck.dir.display(), cfg.describe());
        eprintln!("{CHAT_COMMANDS}");
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("\n> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = start.clone();
                eprintln!("(history cleared)");
                continue;
            }
            "/history" => {
                for m in &history {
                    eprintln!("{}: {}", m.role, m.content);
                }
                if history.is_empty() {
                    eprintln!("(no messages yet)");
                }
                continue;
            }
            "/help" | "/?" => {
                eprintln!("{CHAT_COMMANDS}");
                continue;
            }
            "/settings" => {
                eprintln!("{}", cfg.describe());
                continue;
            }
            // an unknown command is not sent to the model as a message
            cmd if cmd.starts_with('/') && !cmd.contains(char::is_whitespace) => {
                eprintln!("unknown command {cmd}: {CHAT_COMMANDS}");
                continue;
            }
            _ => {}
        }
        history.push(Message::user(line));
        let prompt = tok.encode_chat(&history)?;
        if let Err(e) =
            PromptRules::for_model(&ck.config, ck.special.mask).check(&prompt, cfg.gen_length)
        {
            if !interactive {
                return Err(e.into());
            }
            history.pop();
            eprintln!("({e}; /reset starts a new conversation)");
            continue;
        }
        let mut view = StepView::new(&ck);
        let mut streamer = Streamer::new(Some(tok), stream);
        let mut on_step = |e: &StepEvent| {
            if a.show_steps {
                view.show(e);
            }
            streamer.step(e);
            ControlFlow::Continue(())
        };
        let t0 = Instant::now();
        let mut m = ck.model.predictor();
        let g = sampler::generate(
            &mut m,
            &PromptBatch::single(prompt),
            &cfg,
            &ck.special,
            &mut rng,
            &mut on_step,
        )?;
        let seconds = t0.elapsed().as_secs_f64();
        let answer = tok.decode_answer(&g.generated_ids[0])?;
        streamer.finish(&answer);
        explain_empty(tok, &g.generated_ids[0], true);
        if interactive {
            let n = answer_tokens(&g.generated_ids, &ck.special);
            eprintln!("{}", summary(n, cfg.gen_length, 1, g.nfe, seconds));
        }
        history.push(Message::assistant(answer));
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct InfillArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Text with masked spans: `<mask:N>` stands for N tokens to fill.
    #[arg(long)]
    pub text: String,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Redraw the canvas live after every step.
    #[arg(long)]
    pub show_steps: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rt: RuntimeArgs,
}

pub fn infill(a: InfillArgs) -> Result<()> {
    let ck = a.rt.load(&a.model.resolve()?)?;
    let tok = ck.tokenizer()?;
    let (canvas, spans) = tok.encode_infill(&a.text, ck.config.max_sequence_length)?;
    if spans.is_empty() {
        bail!("invalid --text: no masked span (write <mask:N> where N tokens should be filled)");
    }
    let masks: usize = spans.iter().map(|s| s.1).sum();
    // Defaults for infilling: one token per step, the whole region as one block.
    let base = SamplerConfig {
        steps: masks,
        block_length: 0,
        ..Default::default()
    };
    let cfg = a.sampler.apply(base, Preset::Fast, false)?;
    let mut rng = Rng::new(a.sampler.seed);
    let mut view = StepView::new(&ck);
    let mut on_step = view.callback(a.show_steps);
    let t0 = Instant::now();
    let mut m = ck.model.predictor();
    let g = sampler::infill(&mut m, &canvas, &cfg, &ck.special, &mut rng, &mut on_step)?;
    let seconds = t0.elapsed().as_secs_f64();
    let out = &g.output_ids[0];
    let fills: Vec<String> = spans
        .iter()
        .map(|&(s, n)| tok.decode(&out[s..s + n], false))
        .collect::<llada::Result<_>>()?;
    let text = tok.decode(out, true)?;
    if a.json {
        return print_json(&serde_json::json!({
            "text": text, "fills": fills, "output_ids": out, "nfe": g.nfe, "seconds": seconds,
        }));
    }
    println!("{text}");
    for (i, f) in fills.iter().enumerate() {
        eprintln!("  span {}: {f:?}", i + 1);
    }
    Ok(())
}
