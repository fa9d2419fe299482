//! Prompt styles (book ch07 §7.2 and exercise 7.1): the book's Alpaca-style `format_input`, the
//! Phi-3 style of the exercise solution, and the model's own chat template (ChatML for SmolLM2).
//!
//! An [`Entry`] is one instruction example (`instruction`, `input`, `output`): what instruction
//! data sets hold, what `generate --input` and `chat` build from a user's text, and what a judge
//! scores. Each style splits an example into the prompt (instruction and input: what generation starts
//! from, and what exercise 7.2's masking hides from the loss) and the response part.
use crate::chat::{ChatTemplate, Message};
use crate::error::LlmError;
use serde::{Deserialize, Serialize};

/// One instruction example. `raw` is the whole record as read (every field kept, for
/// `responses.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub instruction: String,
    /// Empty when the record has no (or an empty) input.
    pub input: String,
    pub output: String,
    pub raw: serde_json::Map<String, serde_json::Value>,
}

impl Entry {
    /// An entry with the book's field names.
    pub fn new(instruction: &str, input: &str, output: &str) -> Self {
        let mut raw = serde_json::Map::new();
        raw.insert("instruction".into(), instruction.into());
        raw.insert("input".into(), input.into());
        raw.insert("output".into(), output.into());
        Self {
            instruction: instruction.into(),
            input: input.into(),
            output: output.into(),
            raw,
        }
    }
}

/// `data.prompt_style`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptStyle {
    /// "Below is an instruction …\n\n### Instruction:\n…" (the book's `format_input`).
    #[default]
    Alpaca,
    /// "<|user|>\n{instruction}\n{input}" and "\n<|assistant|>:\n{output}" (exercise 7.1's
    /// `format_input_phi`, ch07/01_main-chapter-code/exercise_experiments.py).
    Phi3,
    /// The model's chat template: one user turn (instruction, then the input after a blank
    /// line), the output as the assistant's turn, closed by the end-of-turn token.
    Chat,
}

impl PromptStyle {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Alpaca => "alpaca",
            Self::Phi3 => "phi3",
            Self::Chat => "chat",
        }
    }
}

/// The book's `format_input`: the instruction and (when non-empty) the input.
pub fn format_input(entry: &Entry) -> String {
    let instruction_text = format!(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{}",
        entry.instruction
    );
    let input_text = if entry.input.is_empty() {
        String::new()
    } else {
        format!("\n\n### Input:\n{}", entry.input)
    };
    instruction_text + &input_text
}

/// Exercise 7.1's `format_input_phi`.
pub fn format_input_phi(entry: &Entry) -> String {
    let input_text = if entry.input.is_empty() {
        String::new()
    } else {
        format!("\n{}", entry.input)
    };
    format!("<|user|>\n{}{input_text}", entry.instruction)
}

/// Formats examples in one style; `Chat` needs the model's template.
#[derive(Debug, Clone)]
pub struct Prompter {
    pub style: PromptStyle,
    pub chat: Option<ChatTemplate>,
}

impl Prompter {
    /// A prompter for `style`; `Chat` without a template is an error naming the model.
    pub fn new(
        style: PromptStyle,
        chat: Option<ChatTemplate>,
        model: &str,
    ) -> Result<Self, LlmError> {
        if style == PromptStyle::Chat && chat.is_none() {
            return Err(LlmError::Usage(format!(
                "data.prompt_style = chat: {model} has no chat template; use alpaca or phi3"
            )));
        }
        Ok(Self { style, chat })
    }

    fn user_message(entry: &Entry) -> String {
        if entry.input.is_empty() {
            entry.instruction.clone()
        } else {
            format!("{}\n\n{}", entry.instruction, entry.input)
        }
    }

    /// The prompt: what generation starts from (instruction and input).
    pub fn prompt(&self, entry: &Entry) -> String {
        match (self.style, &self.chat) {
            (PromptStyle::Alpaca, _) => format_input(entry),
            (PromptStyle::Phi3, _) => format_input_phi(entry),
            (PromptStyle::Chat, Some(t)) => {
                t.render(&[Message::new("user", &Self::user_message(entry))], true)
            }
            (PromptStyle::Chat, None) => format_input(entry),
        }
    }

    /// The text that follows the prompt in a training example.
    pub fn response(&self, output: &str) -> String {
        match (self.style, &self.chat) {
            (PromptStyle::Alpaca, _) => format!("\n\n### Response:\n{output}"),
            (PromptStyle::Phi3, _) => format!("\n<|assistant|>:\n{output}"),
            (PromptStyle::Chat, Some(t)) => format!("{output}{}", t.end_of_turn()),
            (PromptStyle::Chat, None) => format!("\n\n### Response:\n{output}"),
        }
    }

    /// The whole training text of an example.
    pub fn full_text(&self, entry: &Entry) -> String {
        self.prompt(entry) + &self.response(&entry.output)
    }

    /// The response in generated text (what follows the prompt), as the book extracts it:
    /// the response header removed, surrounding whitespace trimmed.
    pub fn extract_response(&self, generated: &str) -> String {
        let text = match self.style {
            PromptStyle::Alpaca => generated.replace("### Response:", ""),
            PromptStyle::Phi3 => generated.replace("<|assistant|>:", ""),
            PromptStyle::Chat => {
                let end = self.chat.as_ref().map_or("<|im_end|>", |t| t.end_of_turn());
                generated.split(end).next().unwrap_or("").to_string()
            }
        };
        text.trim().to_string()
    }
}
