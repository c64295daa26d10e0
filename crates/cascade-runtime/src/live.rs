//! A live session (`run`, `serve`, a worker): task, config, expert and state
//! folder assembled in one place, restored from a checkpoint when resuming.

use std::path::PathBuf;

use cascade_expert::Task;

use crate::build::{build_session, load_config, Overrides};
use crate::checkpoint::{fingerprint, Position, Resume, StateDir};
use crate::error::Result;
use crate::experts::{build_expert, ExpertSpec};
use crate::session::{OnExpertFailure, Session};

/// Everything a live session is started from.
#[derive(Debug, Clone)]
pub struct LiveSpec {
    /// A task file (tasks/imdb.toml) or a preset name.
    pub task: String,
    pub config: PathBuf,
    pub overrides: Overrides,
    /// The folder of the models configs name.
    pub models: PathBuf,
    pub expert: ExpertSpec,
    /// `None`: the deepest level's exploration floor.
    pub audit_rate: Option<f64>,
    pub on_failure: OnExpertFailure,
    /// Checkpoint folder.
    pub state: Option<PathBuf>,
    pub resume: Resume,
    /// Items to come, when known (`llm_budget` needs it).
    pub stream_length: Option<u64>,
}

/// A started live session.
pub struct Live {
    pub task: Task,
    /// The checked config, overrides applied.
    pub config: cascade::CascadeConfig,
    pub session: Session,
    pub expert: std::sync::Arc<dyn cascade_expert::Expert>,
    pub state: Option<StateDir>,
    /// Where the checkpoint left the stream, when one was restored.
    pub resumed: Option<Position>,
}

impl Live {
    /// `schedule`: whatever else the decisions depend on (calls in flight,
    /// checkpoint spacing); a checkpoint must match it too.
    pub fn start(spec: &LiveSpec, schedule: &str) -> Result<Self> {
        let task = Task::load(&spec.task)?;
        let config = load_config(&spec.config, &spec.overrides, &spec.models)?;
        let mut session = build_session(
            &config,
            task.num_labels(),
            spec.audit_rate,
            spec.on_failure,
            spec.stream_length,
        )?;
        let options = session.options();
        let expert = build_expert(&spec.expert, &task)?;
        // The stream's length matters to a call budget only: without one, a
        // run may resume over an input that has grown since.
        let schedule = match config.llm_budget {
            Some(_) => format!("{schedule}|stream length {:?}", spec.stream_length),
            None => schedule.to_string(),
        };
        let fingerprint = fingerprint(
            &config,
            &task,
            &spec.expert.fingerprint(),
            options,
            &schedule,
        );
        let (state, resumed) = match &spec.state {
            Some(dir) => {
                let (state, resumed) = StateDir::open(dir, spec.resume, fingerprint, &mut session)?;
                (Some(state), resumed)
            }
            None => (None, None),
        };
        Ok(Self {
            task,
            config,
            session,
            expert,
            state,
            resumed,
        })
    }
}
