//! Synthetic, seeded task data made by the project itself: small instruction tasks for SFT
//! (arithmetic, list reversal, copying, question answering over a given fact) with exact answers,
//! so a small model can be fine-tuned and its accuracy measured.

use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::rng::Rng;

/// Words for lists and phrases (frequent in the King James Bible, so the tokenizer knows them).
pub const WORDS: &[&str] = &[
    "lord", "god", "king", "land", "house", "people", "son", "day", "man", "earth", "father",
    "city", "heart", "name", "hand", "word", "water", "bread", "light", "life", "fire", "mount",
    "sea", "gold", "silver", "stone", "tree", "field", "sheep", "voice", "way", "heaven", "night",
    "morning", "river", "temple", "servant", "brother", "mother", "wife", "child", "priest",
    "prophet", "spirit", "truth", "peace", "glory", "power", "sword", "horse",
];

/// Names and places for the question-answering facts.
pub const NAMES: &[&str] = &[
    "Abel", "Adah", "Amos", "Asher", "Boaz", "Caleb", "Dinah", "Eli", "Enoch", "Ezra", "Gad",
    "Hagar", "Hosea", "Isaac", "Jael", "Joel", "Jonah", "Kenan", "Leah", "Levi", "Micah", "Naomi",
    "Nahum", "Obed", "Omar", "Ruth", "Saul", "Seth", "Tamar", "Uriah", "Zadok",
];

pub const PLACES: &[&str] = &[
    "Bethel", "Hebron", "Jericho", "Shiloh", "Gilead", "Bashan", "Sharon", "Judah", "Samaria",
    "Egypt", "Sidon", "Tyre", "Moab", "Edom", "Gaza", "Dan", "Zion", "Carmel", "Jordan",
];

pub const THINGS: &[&str] = &[
    "sheep", "goats", "camels", "vines", "olives", "figs", "horses", "oxen", "doves", "cedars",
];

/// The task families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Addition,
    Subtraction,
    Reverse,
    Copy,
    Qa,
    /// Continue a verse of a given text (`continuations`).
    Continue,
}

impl Task {
    pub const ALL: [Task; 5] = [
        Task::Addition,
        Task::Subtraction,
        Task::Reverse,
        Task::Copy,
        Task::Qa,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::Addition => "addition",
            Task::Subtraction => "subtraction",
            Task::Reverse => "reverse",
            Task::Copy => "copy",
            Task::Qa => "qa",
            Task::Continue => "continue",
        }
    }
}

/// One chat example with its exact answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskExample {
    pub task: Task,
    pub messages: Vec<Message>,
}

impl TaskExample {
    /// The expected answer (the assistant message).
    pub fn answer(&self) -> &str {
        self.messages
            .last()
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }
}

fn pick<'a>(rng: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.below(xs.len())]
}

fn words(rng: &mut Rng, n: usize) -> Vec<&'static str> {
    (0..n).map(|_| pick(rng, WORDS)).collect()
}

/// One example of `task`.
pub fn example(task: Task, rng: &mut Rng) -> TaskExample {
    let (q, a) = match task {
        Task::Addition => {
            let (x, y) = (rng.below(50), rng.below(50));
            (
                format!("What is {x} + {y}?"),
                format!("{x} + {y} = {}.", x + y),
            )
        }
        Task::Subtraction => {
            let (x, y) = (rng.below(100), rng.below(100));
            let (x, y) = (x.max(y), x.min(y));
            (
                format!("What is {x} - {y}?"),
                format!("{x} - {y} = {}.", x - y),
            )
        }
        Task::Reverse => {
            let n = 2 + rng.below(4);
            let w = words(rng, n);
            let mut r = w.clone();
            r.reverse();
            (
                format!("Reverse the list: {}.", w.join(", ")),
                format!("{}.", r.join(", ")),
            )
        }
        Task::Copy => {
            let n = 2 + rng.below(5);
            let w = words(rng, n);
            (
                format!("Repeat after me: {}.", w.join(" ")),
                format!("{}.", w.join(" ")),
            )
        }
        Task::Continue => (String::from("Continue:"), String::new()),
        Task::Qa => {
            let (who, place, thing) = (pick(rng, NAMES), pick(rng, PLACES), pick(rng, THINGS));
            let n = 2 + rng.below(9);
            let facts = format!("{who} lives in {place} and keeps {n} {thing}.");
            match rng.below(3) {
                0 => (
                    format!("{facts} Where does {who} live?"),
                    format!("{who} lives in {place}."),
                ),
                1 => (
                    format!("{facts} How many {thing} does {who} keep?"),
                    format!("{who} keeps {n} {thing}."),
                ),
                _ => (
                    format!("{facts} What does {who} keep?"),
                    format!("{who} keeps {thing}."),
                ),
            }
        }
    };
    TaskExample {
        task,
        messages: vec![Message::user(q), Message::assistant(a)],
    }
}

/// `n` examples, tasks drawn uniformly, seeded.
pub fn tasks(n: usize, seed: u64) -> Vec<TaskExample> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let t = Task::ALL[rng.below(Task::ALL.len())];
            example(t, &mut rng)
        })
        .collect()
}

/// Continuation examples from lines of a text: "Continue: <first half of the line>" → the rest.
/// Lines of fewer than 6 words are skipped; `n` lines are drawn (seeded) without replacement.
pub fn continuations(lines: &[&str], n: usize, seed: u64) -> Vec<TaskExample> {
    let usable: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.split_whitespace().count() >= 6)
        .collect();
    let mut rng = Rng::new(seed);
    let order = rng.permutation(usable.len());
    order
        .into_iter()
        .take(n)
        .map(|i| {
            let words: Vec<&str> = usable[i].split_whitespace().collect();
            let cut = words.len() / 2;
            TaskExample {
                task: Task::Continue,
                messages: vec![
                    Message::user(format!("Continue: {}", words[..cut].join(" "))),
                    Message::assistant(words[cut..].join(" ")),
                ],
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_correct() {
        assert_eq!(tasks(50, 3), tasks(50, 3));
        assert_ne!(tasks(50, 3), tasks(50, 4));
        for ex in tasks(500, 1) {
            let q = &ex.messages[0].content;
            match ex.task {
                Task::Addition => {
                    let nums: Vec<usize> = q
                        .trim_end_matches('?')
                        .split(|c: char| !c.is_ascii_digit())
                        .filter_map(|s| s.parse().ok())
                        .collect();
                    assert!(ex.answer().ends_with(&format!("= {}.", nums[0] + nums[1])));
                }
                Task::Reverse => {
                    let list = q
                        .trim_start_matches("Reverse the list: ")
                        .trim_end_matches('.');
                    let mut w: Vec<&str> = list.split(", ").collect();
                    w.reverse();
                    assert_eq!(ex.answer(), format!("{}.", w.join(", ")));
                }
                Task::Copy => assert!(q.ends_with(ex.answer())),
                _ => {}
            }
        }
    }
}
