//! `cascade_stream._native`: the cascade runtime for Python.
//!
//! A thin adapter: the cascade is built by `cascade_runtime::build_session`,
//! items go through the runtime's `Session` (one at a time: `route`/`learn`)
//! or its `Pipeline` (a stream: `run`), and state is the runtime's sealed
//! checkpoint. Nothing here decides who answers.
//!
//! Locking: a cascade's state sits behind a mutex that is only taken with
//! the GIL released (`Python::detach`), and nothing holding it calls Python,
//! so a thread waiting for it never holds the GIL another thread needs.

mod expert;
mod records;
mod run;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use cascade_expert::Task;
use cascade_runtime::checkpoint::{decode_checkpoint, encode_checkpoint, fingerprint, Checkpoint};
use cascade_runtime::{
    build_session, config_from_toml, load_config, Next, OnExpertFailure, Overrides, RuntimeError,
    Session, Ticket,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::records::{counts_dict, PyAnswer};
use crate::run::Run;

create_exception!(
    _native,
    ConfigError,
    PyValueError,
    "A config, task or option that cannot work; the message names the field."
);
create_exception!(
    _native,
    CascadeError,
    PyException,
    "The cascade or its expert failed at run time."
);

/// A runtime error as the Python exception a user can catch by kind.
pub(crate) fn to_py(error: RuntimeError) -> PyErr {
    match error {
        RuntimeError::Config { .. } | RuntimeError::Setting { .. } | RuntimeError::Task(_) => {
            ConfigError::new_err(error.to_string())
        }
        other => CascadeError::new_err(other.to_string()),
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the task came from, so a pickled cascade can be rebuilt.
#[derive(Clone)]
enum TaskSource {
    /// A preset name (imdb, hatespeech, isear, fever).
    Preset(String),
    /// A task file's text.
    Toml(String),
    Labels(Vec<String>),
}

impl TaskSource {
    fn task(&self) -> Result<Task, RuntimeError> {
        Ok(match self {
            Self::Preset(name) => Task::load(name)?,
            Self::Toml(text) => Task::from_toml(text)?,
            Self::Labels(labels) => Task::with_default_rules("custom", labels.clone())?,
        })
    }
}

/// Everything a cascade is (re)built from.
#[derive(Clone)]
struct Recipe {
    /// The checked config as TOML (overrides applied, model paths resolved).
    config_toml: String,
    task: TaskSource,
    audit_rate: Option<f64>,
    on_failure: OnExpertFailure,
    stream_length: Option<u64>,
}

fn busy() -> PyErr {
    PyRuntimeError::new_err("a run() is in progress on this cascade: exhaust or close it first")
}

fn parse_failure_policy(name: &str) -> PyResult<OnExpertFailure> {
    match name {
        "student" => Ok(OnExpertFailure::Student),
        "error" => Ok(OnExpertFailure::Error),
        other => Err(ConfigError::new_err(format!(
            "on_expert_failure must be \"student\" or \"error\", not {other:?}"
        ))),
    }
}

fn failure_policy_name(policy: OnExpertFailure) -> &'static str {
    match policy {
        OnExpertFailure::Student => "student",
        OnExpertFailure::Error => "error",
    }
}

/// Tells `Deferred`s of one cascade from another's.
static NEXT_CASCADE_ID: AtomicU64 = AtomicU64::new(1);

/// A cascade of students in front of an LLM, learning from its answers.
#[pyclass(module = "cascade_stream._native", frozen)]
pub struct Cascade {
    id: u64,
    task: Task,
    levels: Vec<String>,
    recipe: Recipe,
    /// What a saved state must match (config, task, options).
    fingerprint: String,
    /// `None` while a `run` holds it.
    pub(crate) session: Mutex<Option<Session>>,
}

impl Cascade {
    fn build(py: Python<'_>, recipe: Recipe) -> PyResult<Self> {
        let built = py.detach(|| -> Result<_, RuntimeError> {
            let task = recipe.task.task()?;
            let config = config_from_toml(&recipe.config_toml, &Overrides::default(), "".as_ref())?;
            let session = build_session(
                &config,
                task.num_labels(),
                recipe.audit_rate,
                recipe.on_failure,
                recipe.stream_length,
            )?;
            let fingerprint = fingerprint(&config, &task, "python", session.options(), "");
            Ok((task, session, fingerprint))
        });
        let (task, session, fingerprint) = built.map_err(to_py)?;
        Ok(Self {
            id: NEXT_CASCADE_ID.fetch_add(1, Ordering::Relaxed),
            task,
            levels: session.level_names().to_vec(),
            recipe,
            fingerprint,
            session: Mutex::new(Some(session)),
        })
    }

    /// Runs `f` on the session with the GIL released.
    fn with_session<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Session) -> R + Send,
    ) -> PyResult<R> {
        py.detach(|| lock(&self.session).as_mut().map(f))
            .ok_or_else(busy)
    }

    pub(crate) fn task(&self) -> &Task {
        &self.task
    }

    pub(crate) fn level_names(&self) -> &[String] {
        &self.levels
    }
}

#[pymethods]
impl Cascade {
    #[new]
    #[pyo3(signature = (
        config, *, task = None, labels = None, models = None, seed = None, mu = None,
        llm_budget = None, llm_rate = None, stream_length = None, audit_rate = None,
        on_expert_failure = "student"
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        config: &Bound<'_, PyAny>,
        task: Option<String>,
        labels: Option<Vec<String>>,
        models: Option<PathBuf>,
        seed: Option<u64>,
        mu: Option<f64>,
        llm_budget: Option<u64>,
        llm_rate: Option<f64>,
        stream_length: Option<u64>,
        audit_rate: Option<f64>,
        on_expert_failure: &str,
    ) -> PyResult<Self> {
        // An agreement target is a config field (`target_agreement`, `confidence`).
        let overrides = Overrides {
            mu,
            seed,
            llm_budget,
            llm_rate,
            ..Overrides::default()
        };
        let models = models.unwrap_or_else(|| PathBuf::from("models"));
        let config = if let Ok(dict) = config.cast::<PyDict>() {
            let json: String = py
                .import("json")?
                .call_method1("dumps", (dict,))?
                .extract()?;
            let value: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| ConfigError::new_err(format!("the config dict: {e}")))?;
            let text = toml::to_string(&value).map_err(|e| {
                ConfigError::new_err(format!("the config dict has no TOML form: {e}"))
            })?;
            config_from_toml(&text, &overrides, &models)
        } else if let Ok(path) = config.extract::<PathBuf>() {
            load_config(&path, &overrides, &models)
        } else {
            return Err(PyTypeError::new_err(
                "config must be a path to a TOML file or a dict of its fields",
            ));
        }
        .map_err(to_py)?;
        let task = match (task, labels) {
            (Some(name), None) if Task::preset(&name).is_some() => TaskSource::Preset(name),
            (Some(path), None) => TaskSource::Toml(std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::new_err(format!(
                    "task {path:?} is not a preset (imdb, hatespeech, isear, fever) and not a readable task file: {e}"
                ))
            })?),
            (None, Some(labels)) => TaskSource::Labels(labels),
            _ => {
                return Err(ConfigError::new_err(
                    "give exactly one of task (a preset name or a task file) and labels",
                ))
            }
        };
        let config_toml = toml::to_string(&config)
            .map_err(|e| CascadeError::new_err(format!("the config has no TOML form: {e}")))?;
        let recipe = Recipe {
            config_toml,
            task,
            audit_rate,
            on_failure: parse_failure_policy(on_expert_failure)?,
            stream_length,
        };
        Self::build(py, recipe)
    }

    /// The label names, in label order.
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.task.labels().to_vec()
    }

    /// The student levels' names, cheapest first.
    #[getter]
    fn levels(&self) -> Vec<String> {
        self.levels.clone()
    }

    /// Fits the TF-IDF statistics of the LR students on a corpus up front
    /// (what `cascade bench` does with a replayed stream); otherwise they are
    /// learned online, text by text.
    fn prefit(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<()> {
        self.with_session(py, |session| {
            let corpus: Vec<&str> = texts.iter().map(String::as_str).collect();
            session.cascade_mut().prefit(&corpus);
        })
    }

    /// Routes one text: an `Answer` when a student answers, else a
    /// `Deferred` to pass to `learn` with the LLM's label.
    fn route(&self, py: Python<'_>, text: &str) -> PyResult<Py<PyAny>> {
        let next = self.with_session(py, |session| {
            match cascade_runtime::input::check_text(text.to_string()) {
                Err(reason) => Ok(Next::Done(session.bad_input(reason))),
                Ok(text) => session.route(&text).map(|routed| routed.next),
            }
        })?;
        match next.map_err(to_py)? {
            Next::Done(settled) => {
                PyAnswer::new(&settled, self.task.labels(), &self.levels).into_py_any(py)
            }
            Next::Ask(ticket) => Ok(Py::new(
                py,
                Deferred {
                    text: ticket.text().to_string(),
                    audit: ticket.is_audit(),
                    cascade: self.id,
                    ticket: Mutex::new(Some(ticket)),
                },
            )?
            .into_any()),
        }
    }

    /// Settles a deferred item with the LLM's answer: a label name, a label
    /// index, a dict of probabilities per label name (its top label is
    /// learned), or None when the LLM gave no label. An answer that is none
    /// of these counts as no label: the failure policy answers. Returns the
    /// item's final `Answer`.
    fn learn(
        &self,
        py: Python<'_>,
        deferred: &Bound<'_, Deferred>,
        answer: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let deferred = deferred.get();
        if deferred.cascade != self.id {
            return Err(PyValueError::new_err(
                "this Deferred was routed by another cascade",
            ));
        }
        let answer = expert::answer_from_py(answer, self.task.labels());
        let ticket: Ticket = lock(&deferred.ticket)
            .take()
            .ok_or_else(|| PyValueError::new_err("this Deferred was already learned"))?;
        let settled = self
            .with_session(py, |session| session.settle(ticket, answer))?
            .map_err(to_py)?;
        PyAnswer::new(&settled, self.task.labels(), &self.levels).into_py_any(py)
    }

    /// River's name for `route`.
    fn predict_one(&self, py: Python<'_>, text: &str) -> PyResult<Py<PyAny>> {
        self.route(py, text)
    }

    /// River's name for `learn`.
    fn learn_one(
        &self,
        py: Python<'_>,
        deferred: &Bound<'_, Deferred>,
        answer: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        self.learn(py, deferred, answer)
    }

    /// Streams items through the cascade and yields one record per item, in
    /// input order. `items`: texts, or dicts with `text` (and any `id`).
    /// `expert`: a callable `text -> label | {label: prob} | None` (sync or
    /// async; given the item as it came when `expert_gets="item"`), or
    /// "recorded", "openai", "local" with their options.
    #[pyo3(signature = (items, expert, *, max_in_flight = 1, expert_gets = "text", **options))]
    fn run(
        slf: &Bound<'_, Self>,
        items: &Bound<'_, PyAny>,
        expert: &Bound<'_, PyAny>,
        max_in_flight: usize,
        expert_gets: &str,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Run> {
        let py = slf.py();
        let items_by_line = match expert_gets {
            "text" => None,
            "item" if expert.is_callable() => Some(expert::ItemsByLine::default()),
            "item" => {
                return Err(ConfigError::new_err(
                    "expert_gets=\"item\" needs a callable expert",
                ))
            }
            other => {
                return Err(ConfigError::new_err(format!(
                    "expert_gets must be \"text\" or \"item\", not {other:?}"
                )))
            }
        };
        let this = slf.get();
        // One call in flight is polled on this thread: the function is called
        // here, with no hop to another thread and back per call.
        let in_place = max_in_flight == 1;
        let interrupt = expert::Interrupt::default();
        let expert = expert::build(
            expert,
            options,
            this.task(),
            items_by_line.clone(),
            in_place,
            interrupt.clone(),
        )?;
        let items = items.try_iter()?;
        let session = py.detach(|| lock(&this.session).take());
        let session = session.ok_or_else(busy)?;
        Run::start(
            slf,
            session,
            expert,
            items,
            max_in_flight,
            items_by_line,
            interrupt,
        )
    }

    /// Counters: items, answers per level, LLM calls, audits and the audited
    /// agreement (95% Wilson interval), failures.
    fn metrics(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let counts = self.with_session(py, |session| session.counts().clone())?;
        counts_dict(py, &counts, &self.levels)
    }

    /// The whole learner as bytes: the same sealed checkpoint format that
    /// `cascade run --state` writes (CBOR, SHA-256 over its content).
    fn save_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.with_session(py, |session| {
            let checkpoint = Checkpoint {
                fingerprint: self.fingerprint.clone(),
                lines_done: session.counts().lines,
                output_bytes: 0,
                input_sha256: None,
                session: session.save_state().map_err(to_py)?,
            };
            encode_checkpoint(&checkpoint).map_err(CascadeError::new_err)
        })??;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Restores what `save_state` gave, into a cascade built the same way
    /// (config, task, audit rate, failure policy); anything else is refused.
    fn load_state(&self, py: Python<'_>, state: &[u8]) -> PyResult<()> {
        let checkpoint = decode_checkpoint(state, &self.fingerprint)
            .map_err(|reason| PyValueError::new_err(format!("the state {reason}")))?;
        self.with_session(py, |session| session.load_state(checkpoint.session))?
            .map_err(to_py)
    }

    /// Pickling: the recipe and the state; unpickling rebuilds and restores.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let state = this.save_state(py)?;
        let recipe = this.recipe.clone();
        let (kind, task) = match recipe.task {
            TaskSource::Preset(name) => ("preset", name.into_pyobject(py)?.into_any()),
            TaskSource::Toml(text) => ("toml", text.into_pyobject(py)?.into_any()),
            TaskSource::Labels(labels) => ("labels", labels.into_pyobject(py)?.into_any()),
        };
        let restore = py.import("cascade_stream._native")?.getattr("_restore")?;
        let args = (
            recipe.config_toml,
            kind,
            task,
            recipe.audit_rate,
            failure_policy_name(recipe.on_failure),
            recipe.stream_length,
            state,
        );
        Ok((restore, args).into_pyobject(py)?.into_any())
    }

    fn __repr__(&self) -> String {
        format!(
            "Cascade({} → llm, labels={:?})",
            self.levels.join(" → "),
            self.task.labels()
        )
    }
}

/// Rebuilds a pickled cascade.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn _restore(
    py: Python<'_>,
    config_toml: String,
    kind: &str,
    task: &Bound<'_, PyAny>,
    audit_rate: Option<f64>,
    on_failure: &str,
    stream_length: Option<u64>,
    state: &[u8],
) -> PyResult<Cascade> {
    let task = match kind {
        "preset" => TaskSource::Preset(task.extract()?),
        "toml" => TaskSource::Toml(task.extract()?),
        "labels" => TaskSource::Labels(task.extract()?),
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown task kind {other:?}"
            )))
        }
    };
    let recipe = Recipe {
        config_toml,
        task,
        audit_rate,
        on_failure: parse_failure_policy(on_failure)?,
        stream_length,
    };
    let cascade = Cascade::build(py, recipe)?;
    cascade.load_state(py, state)?;
    Ok(cascade)
}

/// An item no student answered (or an audit): ask your LLM for `text`, then
/// pass its answer to `Cascade.learn`.
#[pyclass(module = "cascade_stream._native", frozen)]
pub struct Deferred {
    #[pyo3(get)]
    text: String,
    /// An audit: a student answered; the LLM's label is compared (never
    /// learned) and given when they differ.
    #[pyo3(get)]
    audit: bool,
    /// The cascade that routed it.
    cascade: u64,
    ticket: Mutex<Option<Ticket>>,
}

#[pymethods]
impl Deferred {
    fn __repr__(&self) -> String {
        let text: String = self.text.chars().take(40).collect();
        format!("Deferred(text={text:?}, audit={})", self.audit)
    }
}

/// A recorded benchmark stream (a dataset folder: stream.jsonl.zst,
/// labels.txt, the split files) as a list of `{"id", "text", "gold", "llm"}`
/// dicts: the gold label and the recorded LLM's label (`field`) by name, or
/// None. `stream`: "test" (the evaluation stream, in the authors' order),
/// "all", or a file of ids.
#[pyfunction]
#[pyo3(signature = (data, task, stream = "test", field = "gpt35"))]
fn read_recorded_stream(
    py: Python<'_>,
    data: PathBuf,
    task: &str,
    stream: &str,
    field: &str,
) -> PyResult<Py<PyAny>> {
    let task = Task::load(task).map_err(|e| to_py(e.into()))?;
    let dataset = py
        .detach(|| cascade_expert::Dataset::load(&data, &task, field))
        .map_err(|e| to_py(e.into()))?;
    let order = cascade_expert::StreamOrder::parse(stream);
    let items = dataset.stream(&order).map_err(|e| to_py(e.into()))?;
    let name = |label: Option<usize>| label.map(|l| task.labels()[l].as_str());
    let list = pyo3::types::PyList::empty(py);
    for item in items {
        let record = PyDict::new(py);
        record.set_item("id", item.id)?;
        record.set_item("text", &item.text)?;
        record.set_item("gold", name(item.gold))?;
        record.set_item("llm", name(item.expert))?;
        list.append(record)?;
    }
    Ok(list.into_any().unbind())
}

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Cascade>()?;
    m.add_class::<Deferred>()?;
    m.add_class::<PyAnswer>()?;
    m.add_class::<Run>()?;
    m.add_function(wrap_pyfunction!(_restore, m)?)?;
    m.add_function(wrap_pyfunction!(read_recorded_stream, m)?)?;
    m.add("ConfigError", m.py().get_type::<ConfigError>())?;
    m.add("CascadeError", m.py().get_type::<CascadeError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
