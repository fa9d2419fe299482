//! From what a user asks to what a loaded model generates from: the prompt text, the extra
//! tokens that end the answer, and how to read the answer out of the generated text. One place
//! for `llmlab generate` (plain text, `--chat`, an instruct run's prompt style with `--input`),
//! `llmlab chat` (a conversation) and later the server.
//!
//! The pieces are the model's chat template ([`crate::chat`], book ch07 bonus) and the prompt
//! style an instruct run learned ([`crate::prompt`], book ch07 §7.2), read off the loaded model
//! ([`LoadedLm::chat`], [`LoadedLm::prompt_style`], [`run_prompter`]).
use crate::chat::Message;
use crate::prompt::{Entry, PromptStyle, Prompter};
use crate::resolve::saved::run_prompter;
use crate::resolve::LoadedLm;

/// What the user gives, and how to format it.
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    /// The text as is: plain completion (`generate --raw`, any model).
    Raw(&'a str),
    /// `generate`'s default: for an instruct run, the instruction (and the input, if any) in the
    /// prompt style it was trained on, as the book's `format_input`; for any other model the
    /// instruction as is, and an input is an error.
    Instruction {
        instruction: &'a str,
        input: Option<&'a str>,
    },
    /// The model's chat template around the messages (a system message first when given),
    /// ending where the assistant's answer begins (`generate --chat`).
    Template {
        system: Option<&'a str>,
        messages: &'a [Message],
    },
    /// A conversation the way the model learned to answer (`llmlab chat`): the chat template as
    /// in [`Mode::Template`], except that a run instruction-tuned on single-turn Alpaca or Phi-3
    /// prompts answers the last message on its own (system and history dropped), its prompt
    /// followed by the response header.
    Conversation {
        system: Option<&'a str>,
        messages: &'a [Message],
    },
}

/// How to read the answer out of the generated tokens' text.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Plain completion: the generated text continues the prompt.
    Continuation,
    /// A chat turn: the generated text, which ends at the end-of-turn token, is the answer.
    Turn,
    /// An instruct run's prompt style: the book's extraction ([`Prompter::extract_response`]).
    Instruct(Prompter),
}

/// The prompt of a request and what goes with it.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// What to encode ([`LoadedLm::encode_prompt`]) and generate from.
    pub text: String,
    /// Token ids besides end-of-sequence that end the answer (for `GenerateSpec::stop_ids`).
    pub stop_ids: Vec<i64>,
    pub answer: Answer,
}

impl Prompt {
    /// The answer in `generated` (the text of the new tokens only).
    pub fn response(&self, generated: &str) -> String {
        match &self.answer {
            Answer::Continuation | Answer::Turn => generated.to_string(),
            Answer::Instruct(p) => p.extract_response(generated),
        }
    }

    /// The prompt style of an instruct run whose single-turn prompts a conversation is answered
    /// with ([`Mode::Conversation`]); `None` for a chat template or plain text.
    pub fn single_turn_style(&self) -> Option<PromptStyle> {
        match &self.answer {
            Answer::Instruct(p) => Some(p.style),
            _ => None,
        }
    }
}

/// Why a model can't take a request; the caller names its flag (`--chat`, `--input`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("{0} has no chat template llmlab knows (ChatML or Llama 3)")]
    NoChatTemplate(String),
    #[error("{0} is not an instruct run (a run folder of `task: instruct`)")]
    NotInstructRun(String),
}

/// The prompt text, stop tokens and answer reading of `mode` for the model `lm`.
pub fn build_prompt(lm: &LoadedLm, mode: &Mode<'_>) -> Result<Prompt, PromptError> {
    let plain = |text: &str| Prompt {
        text: text.to_string(),
        stop_ids: Vec::new(),
        answer: Answer::Continuation,
    };
    if let Mode::Conversation { messages, .. } = mode {
        if let Some((p, stops)) = single_turn(lm) {
            let last = messages.last().map_or("", |m| m.content.as_str());
            return Ok(Prompt {
                // The prompt and the response header the model was trained to continue.
                text: p.prompt(&Entry::new(last, "", "")) + &p.response(""),
                stop_ids: stops,
                answer: Answer::Instruct(p),
            });
        }
    }
    match *mode {
        Mode::Raw(text) => Ok(plain(text)),
        Mode::Instruction { instruction, input } => match run_prompter(lm) {
            Some((p, stops)) => Ok(Prompt {
                text: p.prompt(&Entry::new(instruction, input.unwrap_or_default(), "")),
                stop_ids: stops,
                answer: Answer::Instruct(p),
            }),
            None if input.is_some() => Err(PromptError::NotInstructRun(lm.name.clone())),
            None => Ok(plain(instruction)),
        },
        Mode::Template { system, messages } | Mode::Conversation { system, messages } => {
            let tpl = lm
                .chat
                .as_ref()
                .ok_or_else(|| PromptError::NoChatTemplate(lm.name.clone()))?;
            let mut msgs = Vec::with_capacity(messages.len() + 1);
            if let Some(s) = system {
                msgs.push(Message::new("system", s));
            }
            msgs.extend(messages.iter().cloned());
            Ok(Prompt {
                text: tpl.render(&msgs, true),
                stop_ids: lm.end_of_turn_id().into_iter().collect(),
                answer: Answer::Turn,
            })
        }
    }
}

/// The prompter and stops of a run instruction-tuned on single-turn prompts (Alpaca or Phi-3),
/// which answers one message at a time; `None` for any other model.
fn single_turn(lm: &LoadedLm) -> Option<(Prompter, Vec<i64>)> {
    match lm.prompt_style {
        Some(PromptStyle::Alpaca | PromptStyle::Phi3) => run_prompter(lm),
        _ => None,
    }
}
