//! The LLM-answer parser of every preset and task file: any answer gives a
//! label in range or none.
#![no_main]

use cascade_expert::Task;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|answer: &str| {
    for name in ["imdb", "hatespeech", "isear", "fever"] {
        let task = Task::preset(name).expect("preset");
        if let Some(label) = task.parse_answer(answer) {
            assert!(label < task.num_labels());
        }
    }
});
