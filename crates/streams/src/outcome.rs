//! The engine's report of a session in the domain's terms: what a consumer
//! port's `run` returns ([`lifecycle_domain::UserLifecycleConsumer::run`]).

use crate::engine::{RunReport, StopReason};

impl From<StopReason> for lifecycle_domain::StopReason {
    fn from(reason: StopReason) -> Self {
        match reason {
            StopReason::Cancelled => Self::Cancelled,
            StopReason::Drained => Self::Drained,
        }
    }
}

impl From<RunReport> for lifecycle_domain::RunOutcome {
    fn from(report: RunReport) -> Self {
        Self {
            reason: report.reason.into(),
            offset: report.offset,
            offset_unsaved: report.offset_unsaved,
        }
    }
}

#[cfg(test)]
mod tests {
    use lifecycle_domain::{EntryId, RunOutcome};

    use super::*;

    #[test]
    fn a_report_keeps_its_reason_and_offset() {
        let outcome = RunOutcome::from(RunReport {
            reason: StopReason::Drained,
            offset: Some(EntryId::new(7, 1)),
            offset_unsaved: true,
        });
        assert_eq!(outcome.reason, lifecycle_domain::StopReason::Drained);
        assert_eq!(outcome.offset, Some(EntryId::new(7, 1)));
        assert!(outcome.offset_unsaved);
        let cancelled: lifecycle_domain::StopReason = StopReason::Cancelled.into();
        assert_eq!(cancelled, lifecycle_domain::StopReason::Cancelled);
    }
}
