//! The research harness: replays of recorded streams, the distilled
//! baseline, the Table 1 grid and its report. Every replay of a cascade
//! drives the runtime's session engine; nothing here decides who answers.

pub mod distil;
pub mod figures;
pub mod grid;
pub mod item_log;
pub mod local_cost;
pub mod replay;
pub mod report;
pub mod select;
