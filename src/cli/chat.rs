//! `llmlab chat`: an interactive terminal chat with a chat model. Each answer streams token by
//! token, the conversation is kept (and re-encoded with the chat template every turn), and the
//! answer stops at the template's end-of-turn token.
use super::ChatArgs;
use crate::chat::Message;
use crate::device::{parse_device, set_threads};
use crate::error::LlmError;
use crate::generate::GenerateSpec;
use crate::prompt::{Entry, PromptStyle};
use crate::resolve::LoadedLm;
use anyhow::Result;
use std::io::{BufRead, Write};

const HELP: &str = "commands: /reset (forget the conversation), /system TEXT (set the system message and reset), /exit";

pub fn chat(a: ChatArgs) -> Result<()> {
    let device = parse_device(&a.compute.device)?;
    set_threads(a.compute.threads);
    let spec = GenerateSpec {
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
    // An instruct run trained on Alpaca or Phi-3 prompts answers one instruction at a time.
    let single_turn = match lm.prompt_style {
        Some(PromptStyle::Alpaca | PromptStyle::Phi3) => crate::resolve::saved::run_prompter(&lm),
        _ => None,
    };
    let tpl = match (&single_turn, lm.chat.clone()) {
        (Some(_), _) => None,
        (None, Some(t)) => Some(t),
        (None, None) => {
            return Err(LlmError::Usage(format!(
                "{} has no chat template llmlab knows (ChatML or Llama 3); use `llmlab generate` for plain completion",
                a.model
            ))
            .into())
        }
    };
    let mut spec = spec;
    spec.eos_id = lm.eos_id;
    spec.stop_ids.extend(lm.end_of_turn_id());
    if let Some((p, stops)) = &single_turn {
        spec.stop_ids.extend(stops);
        eprintln!(
            "[{} was instruction-tuned on single-turn {} prompts: each message is answered on its own, without the conversation]",
            a.model,
            p.style.name()
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
        let text = match (&single_turn, &tpl) {
            // The prompt and the response header the model was trained to continue.
            (Some((p, _)), _) => {
                history.clear();
                p.prompt(&Entry::new(line, "", "")) + &p.response("")
            }
            (None, Some(tpl)) => {
                let mut msgs = Vec::with_capacity(history.len() + 1);
                if let Some(s) = &system {
                    msgs.push(Message::new("system", s));
                }
                msgs.extend(history.iter().cloned());
                tpl.render(&msgs, true)
            }
            (None, None) => unreachable!("a chat template or a single-turn prompt style"),
        };
        let prompt = lm.encode_prompt(&text)?;
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
