//! The job state machine: which state may follow which, as one table.
//!
//! Every write of a job's state goes through [`check`] before it reaches the
//! store, and the store applies it as a compare-and-set on the current state,
//! so the rules here are the only rules.

use std::fmt;

use crate::proto::v1::job::State as ProtoState;

/// A job's lifecycle state. Unlike the wire enum it has no "unspecified"
/// value, so a job in the domain always has a real state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Stored, waiting for a worker.
    Created,
    /// An attempt is running under a lease.
    Running,
    /// Finished successfully (terminal).
    Completed,
    /// Failed with no attempts left (terminal).
    Failed,
    /// Cancelled by a user (terminal).
    Cancelled,
    /// Waiting out the backoff before the next attempt.
    Retrying,
}

/// Every allowed transition; anything not listed is illegal.
const ALLOWED: &[(State, State)] = &[
    (State::Created, State::Running),
    (State::Created, State::Cancelled),
    (State::Running, State::Completed),
    (State::Running, State::Failed),
    (State::Running, State::Cancelled),
    (State::Running, State::Retrying),
    (State::Retrying, State::Running),
    (State::Retrying, State::Cancelled),
];

/// A transition the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition from {from} to {to}")]
pub struct IllegalTransition {
    /// The job's current state.
    pub from: State,
    /// The state that was asked for.
    pub to: State,
}

impl State {
    /// All states, in wire order.
    pub const ALL: [State; 6] = [
        State::Created,
        State::Running,
        State::Completed,
        State::Failed,
        State::Cancelled,
        State::Retrying,
    ];

    /// COMPLETED, FAILED and CANCELLED never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Completed | State::Failed | State::Cancelled)
    }

    /// Whether `self -> to` is an allowed transition.
    pub fn can_become(self, to: State) -> bool {
        ALLOWED.contains(&(self, to))
    }

    /// The upper-case name used on the wire, in JSON and in Redis.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "CREATED",
            State::Running => "RUNNING",
            State::Completed => "COMPLETED",
            State::Failed => "FAILED",
            State::Cancelled => "CANCELLED",
            State::Retrying => "RETRYING",
        }
    }

    /// Parses an upper-case name as written by [`State::as_str`].
    pub fn from_name(name: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The wire enum value.
    pub fn to_proto(self) -> ProtoState {
        match self {
            State::Created => ProtoState::Created,
            State::Running => ProtoState::Running,
            State::Completed => ProtoState::Completed,
            State::Failed => ProtoState::Failed,
            State::Cancelled => ProtoState::Cancelled,
            State::Retrying => ProtoState::Retrying,
        }
    }

    /// The domain state of a wire value; `None` for STATE_UNSPECIFIED.
    pub fn from_proto(state: ProtoState) -> Option<State> {
        match state {
            ProtoState::Unspecified => None,
            ProtoState::Created => Some(State::Created),
            ProtoState::Running => Some(State::Running),
            ProtoState::Completed => Some(State::Completed),
            ProtoState::Failed => Some(State::Failed),
            ProtoState::Cancelled => Some(State::Cancelled),
            ProtoState::Retrying => Some(State::Retrying),
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks `from -> to` against the table.
pub fn check(from: State, to: State) -> Result<(), IllegalTransition> {
    if from.can_become(to) {
        Ok(())
    } else {
        Err(IllegalTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transitions the issue lists, written out independently of the
    /// table so a typo in either shows up.
    fn expected(from: State, to: State) -> bool {
        use State::*;
        matches!(
            (from, to),
            (Created, Running)
                | (Created, Cancelled)
                | (Running, Completed)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, Retrying)
                | (Retrying, Running)
                | (Retrying, Cancelled)
        )
    }

    #[test]
    fn every_pair_of_states_is_decided_by_the_table() {
        let mut allowed = 0;
        for from in State::ALL {
            for to in State::ALL {
                let result = check(from, to);
                assert_eq!(result.is_ok(), expected(from, to), "{from} -> {to}");
                if let Err(e) = result {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(from.as_str()) && msg.contains(to.as_str()),
                        "{msg}"
                    );
                } else {
                    allowed += 1;
                }
            }
        }
        assert_eq!(allowed, 8);
    }

    #[test]
    fn terminal_states_have_no_way_out() {
        for from in State::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in State::ALL {
                assert!(check(from, to).is_err(), "{from} -> {to}");
            }
        }
        let terminal: Vec<_> = State::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(
            terminal,
            [State::Completed, State::Failed, State::Cancelled]
        );
    }

    #[test]
    fn no_state_transitions_to_itself_or_back_to_created() {
        for s in State::ALL {
            assert!(!s.can_become(s), "{s} -> {s}");
            assert!(!s.can_become(State::Created), "{s} -> CREATED");
        }
    }

    proptest::proptest! {
        /// A random walk: from CREATED, ask for any state again and again.
        /// Only the table's transitions are taken, a refusal names both
        /// states and changes nothing, and the first terminal state is the
        /// last.
        #[test]
        fn random_walks_follow_the_table(
            asks in proptest::collection::vec(proptest::sample::select(State::ALL.to_vec()), 0..64)
        ) {
            let mut state = State::Created;
            let mut terminal = None;
            for to in asks {
                let from = state;
                match check(from, to) {
                    Ok(()) => {
                        proptest::prop_assert!(expected(from, to), "{} -> {} taken", from, to);
                        state = to;
                    }
                    Err(e) => {
                        proptest::prop_assert!(!expected(from, to), "{} -> {} refused", from, to);
                        proptest::prop_assert_eq!(e, IllegalTransition { from, to });
                    }
                }
                if let Some(end) = terminal {
                    proptest::prop_assert_eq!(state, end, "left a terminal state");
                }
                if state.is_terminal() {
                    terminal = Some(state);
                }
            }
        }
    }

    #[test]
    fn names_and_wire_values_round_trip() {
        for s in State::ALL {
            assert_eq!(State::from_name(s.as_str()), Some(s));
            assert_eq!(State::from_proto(s.to_proto()), Some(s));
            assert_eq!(s.to_proto().as_str_name(), s.as_str());
        }
        assert_eq!(State::from_proto(ProtoState::Unspecified), None);
        assert_eq!(State::from_name("created"), None);
        assert_eq!(State::from_name(""), None);
    }
}
