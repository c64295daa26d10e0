//! A classification task: its label set and the parser that turns an LLM's raw
//! answer into a label.

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum TaskError {
    #[error("task `{task}`: {reason}")]
    Invalid { task: String, reason: String },
}

/// One parsing rule: if the lower-cased answer contains `pattern`, the answer is `label`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseRule {
    pub pattern: String,
    pub label: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    name: String,
    labels: Vec<String>,
    rules: Vec<ParseRule>,
    prompt: Option<Prompt>,
}

/// How to ask an LLM for a label: the paper's chat prompt and, for base models
/// without a chat template, a few-shot completion prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// What the LLM is asked to answer for each label, in label order.
    pub label_words: Vec<String>,
    pub system: Option<String>,
    /// The user message; `{text}` stands for the item.
    pub user: String,
    pub few_shot: Option<FewShot>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewShot {
    /// Opens the prompt.
    #[serde(default)]
    pub instruction: String,
    /// One example; `{text}` and `{label_word}` stand for its parts. The item
    /// is rendered with it too, cut where its `{label_word}` begins.
    pub template: String,
    #[serde(default = "default_separator")]
    pub separator: String,
    pub examples: Vec<FewShotExample>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewShotExample {
    pub text: String,
    /// A label name.
    pub label: String,
}

fn default_separator() -> String {
    "\n\n".into()
}

/// A task file (`tasks/*.toml`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    name: String,
    labels: Vec<String>,
    label_words: Option<Vec<String>>,
    system: Option<String>,
    user: String,
    #[serde(default)]
    rules: Vec<RuleFile>,
    few_shot: Option<FewShot>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    pattern: String,
    /// A label name.
    label: String,
}

impl Task {
    /// A task with explicit parsing rules, tried in order.
    pub fn new(
        name: impl Into<String>,
        labels: Vec<String>,
        rules: Vec<ParseRule>,
    ) -> Result<Self, TaskError> {
        let name = name.into();
        let invalid = |reason: String| TaskError::Invalid {
            task: name.clone(),
            reason,
        };
        if labels.len() < 2 {
            return Err(invalid(format!(
                "needs at least 2 labels, got {}",
                labels.len()
            )));
        }
        for (i, label) in labels.iter().enumerate() {
            if label.trim().is_empty() {
                return Err(invalid(format!("label {i} is empty")));
            }
            if labels[..i].contains(label) {
                return Err(invalid(format!("label `{label}` appears twice")));
            }
        }
        for rule in &rules {
            if rule.pattern.is_empty() {
                return Err(invalid("a parse rule has an empty pattern".into()));
            }
            if rule.label >= labels.len() {
                return Err(invalid(format!(
                    "parse rule `{}` points at label {} but there are only {} labels",
                    rule.pattern,
                    rule.label,
                    labels.len()
                )));
            }
        }
        Ok(Self {
            name,
            labels,
            rules,
            prompt: None,
        })
    }

    /// Reads a task file: labels, the parser's rules (label names; with none,
    /// the lower-cased label names in label order), the prompt and the
    /// few-shot block. Errors name the field.
    pub fn from_toml(text: &str) -> Result<Self, TaskError> {
        let file: TaskFile = toml::from_str(text).map_err(|e| TaskError::Invalid {
            task: "(file)".into(),
            reason: e.to_string(),
        })?;
        let invalid = |reason: String| TaskError::Invalid {
            task: file.name.clone(),
            reason,
        };
        let label_of = |field: &str, name: &str| {
            file.labels.iter().position(|l| l == name).ok_or_else(|| {
                invalid(format!(
                    "{field}: `{name}` is not one of the labels {:?}",
                    file.labels
                ))
            })
        };
        let mut task = if file.rules.is_empty() {
            Self::with_default_rules(file.name.clone(), file.labels.clone())?
        } else {
            let rules = file
                .rules
                .iter()
                .map(|r| {
                    Ok(ParseRule {
                        pattern: r.pattern.to_lowercase(),
                        label: label_of("rules.label", &r.label)?,
                    })
                })
                .collect::<Result<_, TaskError>>()?;
            Self::new(file.name.clone(), file.labels.clone(), rules)?
        };
        if !file.user.contains("{text}") {
            return Err(invalid(
                "user: the prompt has no `{text}` for the item".into(),
            ));
        }
        let label_words = file
            .label_words
            .clone()
            .unwrap_or_else(|| file.labels.clone());
        if label_words.len() != file.labels.len() {
            return Err(invalid(format!(
                "label_words: {} words for {} labels",
                label_words.len(),
                file.labels.len()
            )));
        }
        if let Some(few_shot) = &file.few_shot {
            for part in ["{text}", "{label_word}"] {
                if !few_shot.template.contains(part) {
                    return Err(invalid(format!("few_shot.template: no `{part}`")));
                }
            }
            for example in &few_shot.examples {
                label_of("few_shot.examples.label", &example.label)?;
            }
        }
        task.prompt = Some(Prompt {
            label_words,
            system: file.system,
            user: file.user,
            few_shot: file.few_shot,
        });
        Ok(task)
    }

    /// A preset name (imdb, hatespeech, isear, fever) or a task file's path.
    pub fn load(name_or_path: &str) -> Result<Self, TaskError> {
        if let Some(task) = Self::preset(name_or_path) {
            return Ok(task);
        }
        let text = std::fs::read_to_string(name_or_path).map_err(|e| TaskError::Invalid {
            task: name_or_path.into(),
            reason: format!(
                "not a preset (imdb, hatespeech, isear, fever) and not a readable task file: {e}"
            ),
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            TaskError::Invalid { task, reason } => TaskError::Invalid {
                task: format!("{task} in {name_or_path}"),
                reason,
            },
        })
    }

    pub fn prompt(&self) -> Option<&Prompt> {
        self.prompt.as_ref()
    }

    /// A task whose parser looks for each label name (lower-cased), in label order.
    pub fn with_default_rules(
        name: impl Into<String>,
        labels: Vec<String>,
    ) -> Result<Self, TaskError> {
        let rules = labels
            .iter()
            .enumerate()
            .map(|(label, name)| ParseRule {
                pattern: name.to_lowercase(),
                label,
            })
            .collect();
        Self::new(name, labels, rules)
    }

    /// The paper's four benchmark tasks, with the authors' `postprocess` rules
    /// (see shared/data/README.md). Returns `None` for an unknown name.
    pub fn preset(name: &str) -> Option<Self> {
        let (labels, rules): (&[&str], &[(&str, usize)]) = match name {
            "imdb" => (&["neg", "pos"], &[("positive", 1), ("negative", 0)]),
            // The authors test "no" before "yes", so "not sure, yes" parses as noHate.
            "hatespeech" => (&["noHate", "hate"], &[("no", 0), ("yes", 1)]),
            "isear" => {
                let labels: &[&str] = &[
                    "joy", "sadness", "anger", "guilt", "shame", "fear", "disgust",
                ];
                return Self::with_default_rules(name, to_strings(labels)).ok();
            }
            "fever" => (&["REFUTES", "SUPPORTS"], &[("true", 1), ("false", 0)]),
            _ => return None,
        };
        let rules = rules
            .iter()
            .map(|&(pattern, label)| ParseRule {
                pattern: pattern.into(),
                label,
            })
            .collect();
        Self::new(name, to_strings(labels), rules).ok()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn num_labels(&self) -> usize {
        self.labels.len()
    }

    pub fn label_index(&self, name: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == name)
    }

    /// The authors' parser: lower-case and trim; an integer is a label index
    /// (`-1` or out of range: no label); otherwise the first rule whose pattern
    /// occurs in the answer wins. `None` means the answer holds no label.
    pub fn parse_answer(&self, raw: &str) -> Option<usize> {
        let answer = raw.trim().to_lowercase();
        if let Ok(index) = answer.parse::<i64>() {
            return usize::try_from(index)
                .ok()
                .filter(|&i| i < self.labels.len());
        }
        self.rules
            .iter()
            .find(|rule| answer.contains(&rule.pattern))
            .map(|rule| rule.label)
    }
}

impl Prompt {
    /// The user message for one item.
    pub fn user_message(&self, text: &str) -> String {
        self.user.replace("{text}", text)
    }

    /// The few-shot completion prompt for one item, ending where the label word
    /// should come; `None` without a few-shot block.
    pub fn few_shot_prompt(&self, labels: &[String], text: &str) -> Option<String> {
        let few_shot = self.few_shot.as_ref()?;
        let render = |text: &str, word: &str| {
            few_shot
                .template
                .replace("{text}", text)
                .replace("{label_word}", word)
        };
        let mut parts = Vec::new();
        if !few_shot.instruction.is_empty() {
            parts.push(few_shot.instruction.clone());
        }
        for example in &few_shot.examples {
            let index = labels.iter().position(|l| *l == example.label)?;
            parts.push(render(&example.text, &self.label_words[index]));
        }
        let item = render(text, "{label_word}");
        let cut = item.rfind("{label_word}").unwrap_or(item.len());
        parts.push(item[..cut].trim_end().to_string());
        Some(parts.join(&few_shot.separator))
    }
}

fn to_strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imdb_rules_follow_the_authors_order() {
        let t = Task::preset("imdb").unwrap();
        assert_eq!(t.parse_answer(" Positive.\n"), Some(1));
        assert_eq!(t.parse_answer("NEGATIVE"), Some(0));
        // "positive" is tested first.
        assert_eq!(t.parse_answer("not positive but negative"), Some(1));
        assert_eq!(t.parse_answer("mixed"), None);
    }

    #[test]
    fn hatespeech_tests_no_before_yes() {
        let t = Task::preset("hatespeech").unwrap();
        assert_eq!(t.parse_answer("Yes"), Some(1));
        assert_eq!(t.parse_answer("No."), Some(0));
        assert_eq!(t.parse_answer("yes, not hate... no"), Some(0));
        // "no" also hides inside other words, as in the authors' code.
        assert_eq!(t.parse_answer("I cannot say, yes"), Some(0));
    }

    #[test]
    fn isear_takes_the_first_key_in_label_order() {
        let t = Task::preset("isear").unwrap();
        assert_eq!(t.parse_answer("sadnessjoy"), Some(0));
        assert_eq!(t.parse_answer("Disgust"), Some(6));
        assert_eq!(t.parse_answer("surprise"), None);
    }

    #[test]
    fn fever_maps_true_and_false() {
        let t = Task::preset("fever").unwrap();
        assert_eq!(t.parse_answer("True"), Some(1));
        assert_eq!(t.parse_answer("false"), Some(0));
    }

    #[test]
    fn integers_are_label_indices() {
        let t = Task::preset("isear").unwrap();
        assert_eq!(t.parse_answer(" 3 "), Some(3));
        assert_eq!(t.parse_answer("-1"), None);
        assert_eq!(t.parse_answer("7"), None);
    }

    #[test]
    fn invalid_tasks_are_rejected_with_a_reason() {
        let err = Task::with_default_rules("t", vec!["a".into()]).unwrap_err();
        assert!(err.to_string().contains("at least 2 labels"));
        let err = Task::with_default_rules("t", vec!["a".into(), "a".into()]).unwrap_err();
        assert!(err.to_string().contains("appears twice"));
        let rules = vec![ParseRule {
            pattern: "x".into(),
            label: 5,
        }];
        let err = Task::new("t", vec!["a".into(), "b".into()], rules).unwrap_err();
        assert!(err.to_string().contains("only 2 labels"));
    }

    #[test]
    fn default_rules_use_lowercased_label_names() {
        let t = Task::with_default_rules("t", vec!["Spam".into(), "Ham".into()]).unwrap();
        assert_eq!(t.parse_answer("this is HAM"), Some(1));
        assert_eq!(t.label_index("Spam"), Some(0));
    }
}
