//! Online cascade learning over text streams (Nie et al., ICML 2024).
//!
//! The library holds the algorithm only: no I/O, no network, no clock. The
//! same config, seed and stream give the same decisions, bit for bit.

pub mod budget;
pub mod cascade;
pub mod confidence;
pub mod config;
pub mod drift;
pub mod gate;
pub mod metrics;
pub mod student;
pub mod target;

pub use budget::{Budget, BudgetController};
pub use cascade::{Cascade, CascadeError, Deferred, Outcome, Routed, Routing};
pub use confidence::{InvalidConfidence, LowerConfidenceSequence};
pub use config::{CascadeConfig, ConfigError};
pub use drift::DriftDetector;
pub use metrics::{AnsweredBy, Metrics, Summary};
pub use student::{Demonstration, Student, StudentError};
pub use target::{AgreementController, AgreementTarget, InvalidTarget};
