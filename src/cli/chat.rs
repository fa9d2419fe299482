//! `llmlab chat`: an interactive terminal chat with a chat model. Each answer streams token by
//! token, the conversation is kept (and re-encoded with the chat template every turn), and the
//! answer stops at the template's end-of-turn token.
use super::ChatArgs;
use crate::chat::Message;
use crate::device::{parse_device, set_threads};
use crate::error::LlmError;
use crate::generate::GenerateSpec;
use crate::request::{build_prompt, Mode};
use crate::resolve::LoadedLm;
use anyhow::Result;
use std::io::{BufRead, Write};

const HELP: &str = "commands: /reset (forget the conversation), /system TEXT (set the system message and reset), /exit";

pub fn chat(a: ChatArgs) -> Result<()> {
    let device = parse_device(&a.compute.device)?;
    set_threads(a.compute.threads);
    let mut spec = GenerateSpec {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: Some(a.top_p),
        seed: a.seed,
        eos_id: None,
        stop_ids: Vec::new(),
        use_cache: true,
    };
    spec.validate()?;
    let mut lm = LoadedLm::load(&a.model, device)?;
    lm.set_dtype(a.dtype)?;
    // The model's chat template; a run instruction-tuned on Alpaca or Phi-3 prompts answers one
    // instruction at a time. An empty conversation checks the model and gives the stops.
    let conversation = |system: Option<&str>, messages: &[Message]| {
        build_prompt(&lm, &Mode::Conversation { system, messages }).map_err(|e| {
            LlmError::Usage(format!("{e}; use `llmlab generate` for plain completion"))
        })
    };
    let first = conversation(None, &[])?;
    spec.eos_id = lm.eos_id;
    spec.stop_ids.extend(&first.stop_ids);
    if let Some(style) = first.single_turn_style() {
        eprintln!(
            "[{} was instruction-tuned on single-turn {} prompts: each message is answered on its own, without the conversation]",
            a.model,
            style.name()
        );
    }
    let mut system = a.system.clone();
    let mut history: Vec<Message> = Vec::new();
    eprintln!("llmlab chat with {} ({HELP})", a.model);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break; // end of input
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.clear();
                eprintln!("[conversation reset]");
                continue;
            }
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            t if t.starts_with("/system") => {
                let s = t.trim_start_matches("/system").trim();
                system = (!s.is_empty()).then(|| s.to_string());
                history.clear();
                eprintln!("[system message set; conversation reset]");
                continue;
            }
            t if t.starts_with('/') => {
                eprintln!("unknown command {t}; {HELP}");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let turn = conversation(system.as_deref(), &history)?;
        if turn.single_turn_style().is_some() {
            history.clear();
        }
        let prompt = lm.encode_prompt(&turn.text)?;
        if prompt.len() as i64 >= lm.context_length() {
            eprintln!(
                "[the conversation has {} tokens, the model's context is {}; /reset to start over]",
                prompt.len(),
                lm.context_length()
            );
            history.pop();
            continue;
        }
        let mut ids: Vec<i64> = Vec::new();
        let mut printed = 0usize;
        let gen = lm.generate_stream(&prompt, &spec, |id| {
            ids.push(id);
            // Print the new part of the decoded answer once it is complete UTF-8.
            if let Ok(text) = lm.decode(&ids) {
                if !text.ends_with('\u{FFFD}') && text.len() > printed {
                    let _ = write!(out, "{}", &text[printed..]);
                    let _ = out.flush();
                    printed = text.len();
                }
            }
            true
        })?;
        let answer = lm.decode(&gen.ids)?;
        if answer.len() > printed {
            write!(out, "{}", &answer[printed..])?;
        }
        writeln!(out)?;
        let n = gen.ids.len().saturating_sub(1).max(1) as f64;
        eprintln!(
            "[{} tokens, {:.1} tokens/s, prompt {} tokens in {:.2} s{}]",
            gen.ids.len(),
            n / gen.decode_seconds.max(1e-9),
            prompt.len(),
            gen.prompt_seconds,
            if gen.stopped_at_eos {
                ""
            } else {
                ", cut at --max-new-tokens"
            }
        );
        history.push(Message::new("assistant", answer.trim()));
    }
    Ok(())
}
