//! Which parameters a fine-tuning run trains: one vocabulary for every task, with the words of
//! the book's `additional_experiments.py` (`--trainable_layers`), and one predicate over the
//! book's parameter names (`trf_blocks.{i}.…`, `final_norm.…`, the head).
//!
//! | word | trains (besides the task's new head, when it has one) |
//! | --- | --- |
//! | `last_layer` (the book's), `head` | nothing else: the new head only |
//! | `head_and_norm` | the final norm |
//! | `last_block`, `last_two_blocks`, `last_N_blocks`, `{last_n_blocks: N}` | the last N blocks and the final norm |
//! | `all` | every parameter |
//! | `lora` | LoRA adapters in every block and the final norm (the base weights stay frozen) |
//!
//! A [`Method`] says how the chosen blocks train: `full` (their weights) or `lora` (adapters
//! beside frozen weights, appendix E). `trainable: lora` is `all` blocks with `method: lora`.
use serde::{Deserialize, Serialize};

/// Random or pretrained starting weights (the book's `--weights`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weights {
    #[default]
    Pretrained,
    /// The same architecture re-initialised: N(0, 0.02) weights, zero biases, unit norms.
    Random,
}

/// `finetune.trainable`: what is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// The new head only (the book's `last_layer`).
    Head,
    /// The head and the final norm.
    HeadAndNorm,
    /// The last N transformer blocks, the final norm and the head (`last_block`,
    /// `last_two_blocks`, `last_N_blocks`).
    LastBlocks(usize),
    /// Every parameter.
    All,
    /// LoRA adapters in every block, with the final norm and the head; the base weights stay
    /// frozen (`all` with `method: lora`).
    Lora,
}

/// `finetune.method`: how the trained blocks train.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Their weights (the book's chapters 6 and 7).
    #[default]
    Full,
    /// LoRA adapters beside frozen weights (appendix E).
    Lora,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Lora => "lora",
        }
    }
}

impl Trainable {
    pub const ACCEPTED: &'static str = "head, last_layer, head_and_norm, last_block, last_two_blocks, last_N_blocks (any N >= 1), {last_n_blocks: N}, all, lora";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "head" | "last_layer" => Self::Head,
            "head_and_norm" => Self::HeadAndNorm,
            "last_block" => Self::LastBlocks(1),
            "last_two_blocks" => Self::LastBlocks(2),
            "all" => Self::All,
            "lora" => Self::Lora,
            _ => {
                let n = s.strip_prefix("last_")?.strip_suffix("_blocks")?;
                let n: usize = n.parse().ok()?;
                if n == 0 {
                    return None;
                }
                Self::LastBlocks(n)
            }
        })
    }

    /// The canonical word (what `config.yaml` records).
    pub fn name(&self) -> String {
        match self {
            Self::Head => "head".into(),
            Self::HeadAndNorm => "head_and_norm".into(),
            Self::LastBlocks(1) => "last_block".into(),
            Self::LastBlocks(n) => format!("last_{n}_blocks"),
            Self::All => "all".into(),
            Self::Lora => "lora".into(),
        }
    }

    /// The first block whose parameters train (`n_layers` when none does), i.e. where a frozen
    /// prefix ends; `0` when the embeddings or adapters in every block train.
    pub fn first_trained_block(&self, n_layers: usize) -> usize {
        match self {
            Self::Head | Self::HeadAndNorm => n_layers,
            Self::LastBlocks(k) => n_layers.saturating_sub(*k),
            Self::All | Self::Lora => 0,
        }
    }

    /// The blocks that get LoRA adapters with `method` (none with full fine-tuning).
    pub fn adapted_blocks(&self, method: Method, n_layers: usize) -> std::ops::Range<usize> {
        match (self, method) {
            (Self::Lora, _) => 0..n_layers,
            (_, Method::Lora) => self.first_trained_block(n_layers)..n_layers,
            (_, Method::Full) => n_layers..n_layers,
        }
    }

    /// Whether the parameter `name` of a model with `n_layers` blocks trains. `head` names the
    /// task's new head (`Some("cls_head.")` for a classifier; `None` when the task keeps the
    /// language-model head); `replaced` names a head that the new one replaces (never trained).
    /// With `method: lora` the blocks' own weights stay frozen and their adapters
    /// (`….lora_A`/`….lora_B`) train instead.
    pub fn trains(
        &self,
        method: Method,
        name: &str,
        n_layers: usize,
        head: Option<&str>,
        replaced: Option<&str>,
    ) -> bool {
        if head.is_some_and(|h| name.starts_with(h)) {
            return true;
        }
        if replaced.is_some_and(|h| name.starts_with(h)) {
            return false;
        }
        let first = self.first_trained_block(n_layers);
        let block = name
            .strip_prefix("trf_blocks.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let norm = name.starts_with("final_norm.");
        let lora = name.contains(".lora_");
        match (self, method) {
            (Self::Head, _) => false,
            (Self::HeadAndNorm, _) => norm,
            (Self::Lora, _) => norm || lora,
            (Self::All, Method::Full) => true,
            // LoRA on every block of a model that keeps its head: the adapters alone (ch07 + app. E).
            (Self::All, Method::Lora) if head.is_none() => lora,
            (Self::All, Method::Lora) => norm || lora,
            (Self::LastBlocks(_), m) => {
                norm || (block.is_some_and(|b| b >= first) && (m == Method::Full || lora))
            }
        }
    }
}

impl Serialize for Trainable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Trainable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// A word, or `{last_n_blocks: N}`.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Map { last_n_blocks: usize },
        }
        let bad = |s: String| {
            serde::de::Error::custom(format!(
                "unknown trainable '{s}'; expected one of: {}",
                Trainable::ACCEPTED
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Word(s) => Trainable::parse(&s).ok_or_else(|| bad(s)),
            Raw::Map { last_n_blocks: 0 } => Err(bad("{last_n_blocks: 0}".into())),
            Raw::Map { last_n_blocks: n } => Ok(Trainable::LastBlocks(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_mean_what_the_book_means() {
        assert_eq!(Trainable::parse("last_layer"), Some(Trainable::Head));
        assert_eq!(
            Trainable::parse("last_two_blocks"),
            Some(Trainable::LastBlocks(2))
        );
        assert_eq!(
            Trainable::parse("last_3_blocks"),
            Some(Trainable::LastBlocks(3))
        );
        assert_eq!(Trainable::parse("last_0_blocks"), None);
        let t: Trainable = serde_yaml::from_str("{last_n_blocks: 4}").expect("map form");
        assert_eq!(t, Trainable::LastBlocks(4));
        let h = Some("cls_head.");
        let r = Some("out_head.");
        let tb = |t: Trainable, m: Method, n: &str, head| t.trains(m, n, 4, head, r);
        assert!(!tb(Trainable::Head, Method::Full, "final_norm.scale", h));
        assert!(tb(Trainable::Head, Method::Full, "cls_head.weight", h));
        assert!(!tb(Trainable::All, Method::Full, "out_head.weight", h));
        assert!(tb(
            Trainable::LastBlocks(2),
            Method::Full,
            "trf_blocks.2.ff.w",
            h
        ));
        assert!(!tb(
            Trainable::LastBlocks(2),
            Method::Full,
            "trf_blocks.1.ff.w",
            h
        ));
        assert!(!tb(
            Trainable::LastBlocks(2),
            Method::Lora,
            "trf_blocks.3.ff.w",
            h
        ));
        assert!(tb(
            Trainable::LastBlocks(2),
            Method::Lora,
            "trf_blocks.3.ff.lora_A",
            h
        ));
        assert!(!tb(
            Trainable::LastBlocks(2),
            Method::Lora,
            "trf_blocks.0.ff.lora_A",
            h
        ));
        // Instruction tuning keeps the language-model head: LoRA trains the adapters alone.
        assert!(!tb(Trainable::All, Method::Lora, "final_norm.scale", None));
        assert!(tb(
            Trainable::All,
            Method::Lora,
            "trf_blocks.0.att.lora_B",
            None
        ));
    }
}
