//! The expert a `run` asks: the user's Python callable, or a built-in one by name.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cascade_expert::{Answer, Expert, ExpertError, FnExpert, LocalConfig, Task};
use cascade_runtime::experts::openai_config;
use cascade_runtime::{build_expert, ExpertSpec};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::{to_py, ConfigError};

/// The LLM's answer as the runtime takes it: a label name, a label index, a
/// dict of probabilities per label name (its top label is the label), or
/// None. Anything else is an answer without a label, never a crash.
pub fn answer_from_py(answer: &Bound<'_, PyAny>, labels: &[String]) -> Result<Answer, ExpertError> {
    let no_label = |why: String| ExpertError::NoLabel { raw: why };
    if answer.is_none() {
        return Err(no_label("None".into()));
    }
    if let Ok(name) = answer.cast::<PyString>() {
        let name = name.to_string_lossy();
        return labels
            .iter()
            .position(|l| *l == name)
            .map(Answer::label)
            .ok_or_else(|| no_label(format!("{name:?} is not one of the labels {labels:?}")));
    }
    if let Ok(dict) = answer.cast::<PyDict>() {
        let mut probs = vec![0f32; labels.len()];
        for (key, value) in dict.iter() {
            let name: String = key
                .extract()
                .map_err(|_| no_label(format!("a probability's key is not a label name: {key}")))?;
            let index = labels
                .iter()
                .position(|l| *l == name)
                .ok_or_else(|| no_label(format!("{name:?} is not one of the labels {labels:?}")))?;
            let p: f64 = value
                .extract()
                .map_err(|_| no_label(format!("the probability of {name:?} is not a number")))?;
            if !p.is_finite() || p < 0.0 {
                return Err(no_label(format!("the probability of {name:?} is {p}")));
            }
            probs[index] = p as f32;
        }
        let total: f32 = probs.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            return Err(no_label("the probabilities sum to 0".into()));
        }
        probs.iter_mut().for_each(|p| *p /= total);
        // The first of equal probabilities, as the students break ties.
        let label = probs
            .iter()
            .enumerate()
            .fold(0, |best, (i, p)| if *p > probs[best] { i } else { best });
        return Ok(Answer {
            probs: Some(probs),
            ..Answer::label(label)
        });
    }
    // bool is an int in Python; a True label is a mistake, not label 1.
    if answer.is_instance_of::<pyo3::types::PyBool>() {
        return Err(no_label(format!("a bool ({answer}) is not a label")));
    }
    if let Ok(index) = answer.extract::<i64>() {
        return usize::try_from(index)
            .ok()
            .filter(|i| *i < labels.len())
            .map(Answer::label)
            .ok_or_else(|| {
                no_label(format!(
                    "label index {index} is out of range (0..{})",
                    labels.len()
                ))
            });
    }
    let kind = answer
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    Err(no_label(format!(
        "expected a label name, a label index, a dict of probabilities or None; got a {kind}"
    )))
}

/// The items of a run by line, for an expert function that takes the item.
pub type ItemsByLine = Arc<Mutex<HashMap<u64, Py<PyAny>>>>;

/// A `KeyboardInterrupt` (or other `BaseException` that is not an
/// `Exception`) raised in the expert function: the run re-raises it.
pub type Interrupt = Arc<Mutex<Option<PyErr>>>;

/// Calls the user's function on a blocking thread (with the GIL) with the
/// text, or with the item as given when `items` holds them (the pipeline's
/// ids are then line numbers); a coroutine it returns is run to completion
/// there (`asyncio.run`: that thread has no event loop of its own). An
/// exception is an expert failure.
fn python_expert(
    callable: Py<PyAny>,
    labels: Vec<String>,
    items: Option<ItemsByLine>,
    in_place: bool,
    interrupt: Interrupt,
) -> FnExpert {
    let callable = Arc::new(callable);
    let expert = FnExpert::new(move |query| {
        Python::attach(|py| {
            let failed = |e: PyErr| {
                let failure = ExpertError::Failed(format!("the expert function raised {e}"));
                if !e.is_instance_of::<PyException>(py) {
                    crate::lock(&interrupt).get_or_insert(e);
                }
                failure
            };
            let argument = match &items {
                None => PyString::new(py, query.text).into_any(),
                Some(items) => {
                    let line = query.id.as_u64().unwrap_or(0);
                    let item = crate::lock(items).get(&line).map(|i| i.clone_ref(py));
                    item.ok_or_else(|| ExpertError::UnknownItem(query.id.to_string()))?
                        .into_bound(py)
                }
            };
            let value = callable.bind(py).call1((argument,)).map_err(failed)?;
            if !value.hasattr("__await__").map_err(failed)? {
                return answer_from_py(&value, &labels);
            }
            // A coroutine runs to completion on a thread of its own, which has
            // no event loop (the caller's thread may be running one: Jupyter).
            let coroutine = value.unbind();
            let done = py.detach(|| {
                std::thread::scope(|scope| {
                    scope
                        .spawn(|| {
                            Python::attach(|py| {
                                py.import("asyncio")?
                                    .call_method1("run", (coroutine,))
                                    .map(Bound::unbind)
                            })
                        })
                        .join()
                })
            });
            match done {
                Ok(Ok(value)) => answer_from_py(value.bind(py), &labels),
                Ok(Err(e)) => Err(failed(e)),
                Err(_) => Err(ExpertError::Failed(
                    "the coroutine's thread panicked".into(),
                )),
            }
        })
    });
    expert.in_place(in_place)
}

fn option<'py, T>(options: Option<&Bound<'py, PyDict>>, name: &str) -> PyResult<Option<T>>
where
    T: for<'a> FromPyObject<'a, 'py, Error = PyErr>,
{
    match options.map(|o| o.get_item(name)).transpose()?.flatten() {
        Some(value) if !value.is_none() => value
            .extract()
            .map(Some)
            .map_err(|e| ConfigError::new_err(format!("option {name}: {e}"))),
        _ => Ok(None),
    }
}

/// The expert `run` was given: a callable (given the text, or the item when
/// `items` is set; called `in_place` on the polling thread, or on a blocking
/// thread), or a name with its options.
pub fn build(
    expert: &Bound<'_, PyAny>,
    options: Option<&Bound<'_, PyDict>>,
    task: &Task,
    items: Option<ItemsByLine>,
    in_place: bool,
    interrupt: Interrupt,
) -> PyResult<Arc<dyn Expert>> {
    let known: &[&str] = match expert.extract::<String>() {
        Ok(name) if name == "recorded" => &["data", "field", "delay_ms"],
        Ok(name) if name == "openai" => &["config", "base_url", "model"],
        Ok(name) if name == "local" => &["model", "max_text_tokens", "cache"],
        Ok(name) => {
            return Err(ConfigError::new_err(format!(
                "expert {name:?}: the built-in experts are \"recorded\", \"openai\" and \"local\" (or pass a callable)"
            )))
        }
        Err(_) if expert.is_callable() => &[],
        Err(_) => {
            return Err(ConfigError::new_err(
                "expert must be a callable (text -> label) or the name of a built-in expert",
            ))
        }
    };
    if let Some(options) = options {
        for key in options.keys() {
            let key: String = key.extract()?;
            if !known.contains(&key.as_str()) {
                return Err(ConfigError::new_err(format!(
                    "unknown option {key:?} for this expert (known: {known:?})"
                )));
            }
        }
    }
    if expert.is_callable() {
        return Ok(Arc::new(python_expert(
            expert.clone().unbind(),
            task.labels().to_vec(),
            items,
            in_place,
            interrupt,
        )));
    }
    let spec = match expert.extract::<String>()?.as_str() {
        "recorded" => ExpertSpec::Recorded {
            data: option::<PathBuf>(options, "data")?.ok_or_else(|| {
                ConfigError::new_err("expert \"recorded\" needs data= (a dataset folder)")
            })?,
            field: option(options, "field")?.unwrap_or_else(|| "gpt35".into()),
            delay: Duration::from_millis(option(options, "delay_ms")?.unwrap_or(0)),
        },
        "openai" => ExpertSpec::OpenAi(
            openai_config(
                option::<PathBuf>(options, "config")?.as_deref(),
                option::<String>(options, "base_url")?.as_deref(),
                option::<String>(options, "model")?.as_deref(),
            )
            .map_err(to_py)?,
        ),
        _ => {
            let mut config = LocalConfig::default();
            if let Some(model) = option(options, "model")? {
                config.model = model;
            }
            if let Some(tokens) = option(options, "max_text_tokens")? {
                config.max_text_tokens = tokens;
            }
            config.cache = option(options, "cache")?;
            ExpertSpec::Local(config)
        }
    };
    let py = expert.py();
    py.detach(|| build_expert(&spec, task)).map_err(to_py)
}
