//! Chat templates: the conversation → prompt text a chat model was trained on, by a small
//! formatter per template family instead of a Jinja engine.
//!
//! * ChatML (SmolLM2, Qwen, …): `<|im_start|>{role}\n{content}<|im_end|>\n` per message, a
//!   default system message when the conversation has none (SmolLM2's template names its own),
//!   and `<|im_start|>assistant\n` as the generation prompt; the turn ends at `<|im_end|>`.
//! * Llama 3: `<|begin_of_text|>`, then `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`;
//!   the turn ends at `<|eot_id|>`.
//!
//! The family is recognised from the model's own template (GGUF `tokenizer.chat_template`, or
//! `tokenizer_config.json`'s `chat_template`), and the rendered text equals what
//! `transformers`' `apply_chat_template` makes of it (tested for SmolLM2).
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    ChatMl { default_system: Option<String> },
    Llama3,
}

impl ChatTemplate {
    /// Recognises the family of a Jinja chat template; `None` when it is neither.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<|im_start|>") {
            let default_system = template
                .split("<|im_start|>system\\n")
                .nth(1)
                .or_else(|| template.split("<|im_start|>system\n").nth(1))
                .and_then(|rest| rest.split("<|im_end|>").next())
                .filter(|s| !s.contains('{') && !s.contains('\''))
                .map(str::to_string);
            return Some(Self::ChatMl { default_system });
        }
        if template.contains("<|start_header_id|>") {
            return Some(Self::Llama3);
        }
        None
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's answer begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        match self {
            Self::ChatMl { default_system } => {
                if let (Some(sys), Some(first)) = (default_system, messages.first()) {
                    if first.role != "system" {
                        out.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                    }
                }
                for m in messages {
                    out.push_str(&format!(
                        "<|im_start|>{}\n{}<|im_end|>\n",
                        m.role, m.content
                    ));
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
            }
            Self::Llama3 => {
                out.push_str("<|begin_of_text|>");
                for m in messages {
                    out.push_str(&format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                        m.role,
                        m.content.trim()
                    ));
                }
                if add_generation_prompt {
                    out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
        }
        out
    }

    /// The token that ends an assistant turn.
    pub fn end_of_turn(&self) -> &'static str {
        match self {
            Self::ChatMl { .. } => "<|im_end|>",
            Self::Llama3 => "<|eot_id|>",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_adds_the_default_system_message() {
        let t = ChatTemplate::detect(
            "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role']}}",
        )
        .expect("ChatML");
        assert_eq!(
            t,
            ChatTemplate::ChatMl {
                default_system: Some("Be brief.".into())
            }
        );
        let text = t.render(&[Message::new("user", "Hi")], true);
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_sys = t.render(
            &[Message::new("system", "S"), Message::new("user", "Hi")],
            false,
        );
        assert_eq!(
            with_sys,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_format() {
        let t = ChatTemplate::detect("{{ '<|start_header_id|>' }}").expect("Llama 3");
        assert_eq!(
            t.render(&[Message::new("user", "Hi ")], true),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(ChatTemplate::detect("{{ messages }}"), None);
    }
}
