//! `Cascade.run`: a stream through the runtime's pipeline, as a Python iterator.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};

use cascade_expert::Expert;
use cascade_runtime::input::{check_text, ItemId};
use cascade_runtime::{Finished, Pipeline, RuntimeError, Session};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyIterator, PyString};

use crate::expert::{Interrupt, ItemsByLine};
use crate::records::record_dict;
use crate::{lock, to_py, Cascade};

/// One async runtime for every run in the process (the experts' calls).
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = cascade_runtime::async_runtime().map_err(to_py)?;
    Ok(RUNTIME.get_or_init(|| runtime))
}

struct State {
    pipeline: Pipeline,
    items: Py<PyIterator>,
    /// The ids the items gave, by line, until their records leave.
    ids: HashMap<usize, Py<PyAny>>,
    ready: VecDeque<Finished>,
    lines: usize,
    exhausted: bool,
    /// Every item as given, for an expert function that takes the item.
    items_by_line: Option<ItemsByLine>,
    /// Ctrl-C caught inside the expert function, to raise here.
    interrupt: Interrupt,
}

/// The records of a `Cascade.run`, one per item, in input order. Items are
/// read as records are asked for; the session returns to the cascade when
/// the items are exhausted or the iterator is closed or dropped (calls still
/// in flight then are not learned).
#[pyclass(module = "cascade_stream._native", frozen)]
pub struct Run {
    cascade: Py<Cascade>,
    state: Mutex<Option<State>>,
}

impl Run {
    pub fn start(
        cascade: &Bound<'_, Cascade>,
        session: Session,
        expert: Arc<dyn Expert>,
        items: Bound<'_, PyIterator>,
        max_in_flight: usize,
        items_by_line: Option<ItemsByLine>,
        interrupt: Interrupt,
    ) -> PyResult<Self> {
        // On a refusal the session goes back to the cascade: nothing is lost.
        let give_back = |session| *lock(&cascade.get().session) = Some(session);
        if max_in_flight == 0 {
            give_back(session);
            return Err(crate::ConfigError::new_err(
                "max_in_flight must be at least 1",
            ));
        }
        let runtime = match runtime() {
            Ok(runtime) => runtime.handle().clone(),
            Err(e) => {
                give_back(session);
                return Err(e);
            }
        };
        let pipeline =
            Pipeline::new(session, expert, runtime, max_in_flight, true).map_err(to_py)?;
        Ok(Self {
            cascade: cascade.clone().unbind(),
            state: Mutex::new(Some(State {
                pipeline,
                items: items.unbind(),
                ids: HashMap::new(),
                ready: VecDeque::new(),
                lines: 0,
                exhausted: false,
                items_by_line,
                interrupt,
            })),
        })
    }

    /// Gives the session back to the cascade.
    fn finish(&self, state: State) {
        let session = state.pipeline.into_session();
        *lock(&self.cascade.get().session) = Some(session);
    }
}

/// An item's id (kept as given), the id the expert sees, and its text or why
/// it has none.
fn read_item(
    item: &Bound<'_, PyAny>,
    line: usize,
) -> (Option<Py<PyAny>>, ItemId, Result<String, String>) {
    if let Ok(text) = item.cast::<PyString>() {
        return (
            None,
            ItemId::line(line),
            check_text(text.to_string_lossy().into_owned()),
        );
    }
    let Ok(dict) = item.cast::<PyDict>() else {
        return (
            None,
            ItemId::null(),
            Err("an item is a text or a dict with a string field `text`".into()),
        );
    };
    let id = dict
        .get_item("id")
        .ok()
        .flatten()
        .filter(|id| !id.is_none());
    // The expert (recorded answers) looks items up by id: ints and strings
    // keep their exact JSON text; other ids are Python's own business.
    let item_id = id
        .as_ref()
        .and_then(|id| {
            if id.is_instance_of::<PyInt>() {
                ItemId::parse(&id.str().ok()?.to_string_lossy())
            } else {
                let text = id.cast::<PyString>().ok()?.to_string_lossy().into_owned();
                ItemId::parse(&serde_json::to_string(&text).ok()?)
            }
        })
        .unwrap_or_else(ItemId::null);
    let text = match dict.get_item("text").ok().flatten() {
        Some(text) => match text.cast::<PyString>() {
            Ok(text) => check_text(text.to_string_lossy().into_owned()),
            Err(_) => Err("no string field `text`".into()),
        },
        None => Err("no string field `text`".into()),
    };
    (id.map(Bound::unbind), item_id, text)
}

#[pymethods]
impl Run {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        // The pipeline calls the user's expert, which needs the GIL: waiting
        // for this lock while holding it could deadlock, so a second caller
        // is refused instead (as a running generator refuses one).
        let mut guard = match self.state.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(PyRuntimeError::new_err(
                    "this run is already being iterated",
                ))
            }
        };
        let Some(state) = guard.as_mut() else {
            return Ok(None);
        };
        let cascade = self.cascade.get();
        loop {
            if let Some(done) = state.ready.pop_front() {
                let id = state.ids.remove(&done.line);
                if let Some(items) = &state.items_by_line {
                    lock(items).remove(&(done.line as u64));
                }
                let record = record_dict(
                    py,
                    id.as_ref(),
                    &done.settled,
                    cascade.task().labels(),
                    cascade.level_names(),
                )?;
                return Ok(Some(record.into_any().unbind()));
            }
            if state.exhausted {
                let pipeline = &mut state.pipeline;
                py.detach(|| pipeline.settle_all()).map_err(to_py)?;
                if let Some(interrupt) = lock(&state.interrupt).take() {
                    return Err(interrupt);
                }
                state.ready.extend(state.pipeline.take_ready());
                if state.ready.is_empty() {
                    if let Some(state) = guard.take() {
                        py.detach(|| self.finish(state));
                    }
                    return Ok(None);
                }
                continue;
            }
            let next = state.items.bind(py).clone().next();
            match next {
                None => state.exhausted = true,
                Some(Err(e)) => return Err(e),
                Some(Ok(item)) => {
                    state.lines += 1;
                    let line = state.lines;
                    let (id, mut item_id, text) = read_item(&item, line);
                    if let Some(items) = &state.items_by_line {
                        // The expert function finds the item by its line.
                        lock(items).insert(line as u64, item.clone().unbind());
                        item_id = ItemId::line(line);
                    }
                    if let Some(id) = id {
                        state.ids.insert(line, id);
                    }
                    let pipeline = &mut state.pipeline;
                    let pushed: Result<(), RuntimeError> = py.detach(|| {
                        pipeline.push(line, item_id, text.as_deref().map_err(Clone::clone))
                    });
                    pushed.map_err(to_py)?;
                    state.ready.extend(state.pipeline.take_ready());
                    // Ctrl-C: raised in the expert function (the item then
                    // counts as an expert failure), or pending: raise it here.
                    if let Some(interrupt) = lock(&state.interrupt).take() {
                        return Err(interrupt);
                    }
                    py.check_signals()?;
                }
            }
        }
    }

    /// Ends the run now: the session goes back to the cascade; items not yet
    /// yielded are dropped (calls in flight are not learned).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let state = match self.state.try_lock() {
            Ok(mut guard) => guard.take(),
            Err(TryLockError::Poisoned(e)) => e.into_inner().take(),
            Err(TryLockError::WouldBlock) => {
                return Err(PyRuntimeError::new_err("this run is being iterated"))
            }
        };
        if let Some(state) = state {
            py.detach(|| self.finish(state));
        }
        Ok(())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(state) = self
            .state
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            self.finish(state);
        }
    }
}
