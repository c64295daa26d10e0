//! What Python sees of a settled item and of a session's counters.

use cascade_runtime::{Counts, Settled};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// How one item ended: who answered, with which label.
#[pyclass(module = "cascade_stream._native", name = "Answer", frozen, get_all)]
pub struct PyAnswer {
    /// The label name; None when nobody gave one (bad input, an error).
    label: Option<String>,
    /// The label's index in `Cascade.labels`.
    label_index: Option<usize>,
    /// A level's name, "llm", or None.
    answered_by: Option<String>,
    /// The answering student's probability per label.
    probs: Option<Vec<f32>>,
    /// "ok", "expert_unavailable", "error" or "bad_input".
    status: &'static str,
    /// Why the item was not answered as it should have been.
    error: Option<String>,
}

impl PyAnswer {
    pub fn new(settled: &Settled, labels: &[String], levels: &[String]) -> Self {
        Self {
            label: settled.label().map(|l| labels[l].clone()),
            label_index: settled.label(),
            answered_by: settled.answered_by(levels).map(str::to_string),
            probs: settled.probs().map(<[f32]>::to_vec),
            status: settled.status(),
            error: settled.error().map(str::to_string),
        }
    }

    pub fn into_py_any(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(Py::new(py, self)?.into_any())
    }
}

#[pymethods]
impl PyAnswer {
    fn __repr__(&self) -> String {
        format!(
            "Answer(label={:?}, answered_by={:?}, status={:?})",
            self.label, self.answered_by, self.status
        )
    }
}

/// The record `run` yields for an item: the fields of `cascade run`'s output
/// records, with the item's id as given.
pub fn record_dict<'py>(
    py: Python<'py>,
    id: Option<&Py<PyAny>>,
    settled: &Settled,
    labels: &[String],
    levels: &[String],
) -> PyResult<Bound<'py, PyDict>> {
    let record = PyDict::new(py);
    record.set_item("id", id)?;
    record.set_item("label", settled.label().map(|l| &labels[l]))?;
    record.set_item("answered_by", settled.answered_by(levels))?;
    record.set_item("probs", settled.probs())?;
    record.set_item("status", settled.status())?;
    if let Some(error) = settled.error() {
        record.set_item("error", error)?;
    }
    Ok(record)
}

/// A session's counters as a dict.
pub fn counts_dict(py: Python<'_>, counts: &Counts, levels: &[String]) -> PyResult<Py<PyAny>> {
    let dict = PyDict::new(py);
    dict.set_item("items", counts.lines)?;
    let answered = PyDict::new(py);
    for (level, n) in levels.iter().zip(&counts.answered) {
        answered.set_item(level, n)?;
    }
    dict.set_item("answered", answered)?;
    dict.set_item("llm", counts.llm)?;
    dict.set_item("deferred", counts.deferred())?;
    dict.set_item("audits", counts.audits)?;
    dict.set_item("llm_calls", counts.deferred() + counts.audits)?;
    dict.set_item("audit_agreements", counts.audit_agreements)?;
    dict.set_item("audited_agreement", counts.audited_agreement())?;
    dict.set_item(
        "audited_agreement_lower_bound",
        (counts.audits > 0).then(|| counts.audit_bound.lower()),
    )?;
    if let Some(target) = &counts.agreement {
        dict.set_item("target_agreement", target.target().agreement)?;
        dict.set_item("confidence", target.target().confidence)?;
        dict.set_item("agreement_lower_bound", target.agreement_bound())?;
    }
    dict.set_item("bad_input", counts.bad_input)?;
    dict.set_item("expert_unavailable", counts.expert_unavailable)?;
    dict.set_item("errors", counts.errors)?;
    Ok(dict.into_any().unbind())
}
