//! Noticing entries deleted before they were read, without I/O: a pure
//! judgement over what reads and the deletion probe saw.
//!
//! Redis keeps no record of what a trim removed, so a loss is reported only
//! when something proves an unread entry existed and is gone:
//!
//! - **Look-ahead.** A read asks for one entry more than it dispatches; that
//!   entry is read again by the next read. If the next read does not start
//!   with it, it was trimmed or deleted unread.
//! - **Anchor.** The probe before a read reports the stream's last generated
//!   id `L` and how many entries were ever added `E` (every entry up to `L`).
//!   At a later probe whose stream begins after our position: if `L` lies
//!   between our position and that first entry, the entry `L` is gone; if we
//!   had read past `L`, entries ever added after `L`, less those we received
//!   and those still in the stream, were removed unread.
//! - **Deletion marker.** `XDEL` records the largest id it removed: one after
//!   our position, up to the end of what the read returned and not among it,
//!   was deleted unread; so was one within the range of the last read that
//!   returned entries and not among them (a deletion made while that read
//!   waited, seen by the next probe).
//!
//! A stream that begins after the position with nothing to prove a gap (the
//! first read after a start, a trim exactly at the position) is reported as a
//! *possible* trim, not as a loss; an id right after the position (same
//! millisecond, next sequence) proves there was no gap. A stream whose last
//! generated id is below the position (deleted and re-created, or an offset
//! set past its end) is reported: nothing new will be read until it passes
//! the position.

use lifecycle_domain::EntryId;

use crate::resp::DeletionProbe;

/// What a read revealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finding {
    /// Entries after the position were removed before they were read.
    Lost {
        /// The position the read started after.
        read_from: EntryId,
        /// An id proven removed unread (or the first entry after the gap).
        evidence: EntryId,
        /// How many were removed, when the counters tell.
        count: Option<u64>,
    },
    /// The stream begins after the position; entries in between, if there
    /// were any, were trimmed unread.
    PossiblyTrimmed {
        /// The position the read started after.
        read_from: EntryId,
        /// The stream's first entry.
        first: EntryId,
    },
    /// The stream's last generated id is below the position.
    BehindPosition {
        /// The position the read started after.
        read_from: EntryId,
        /// The stream's last generated id.
        last_generated: EntryId,
    },
}

/// What one probe established for the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Anchor {
    last_generated: EntryId,
    entries_added: u64,
    /// Entries received since, with ids after `last_generated`.
    received_after: u64,
}

/// One read as the judgement needs it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReadSeen<'a> {
    /// The position the read started after.
    pub read_from: EntryId,
    /// The ids of the entries it returned for dispatch, in order.
    pub ids: &'a [EntryId],
    /// The entry it returned beyond those (a full read's extra entry).
    pub look_ahead: Option<EntryId>,
    /// What the probe just before it saw, if one was sent.
    pub probe: Option<DeletionProbe>,
}

/// The memory the judgement keeps between reads.
#[derive(Debug, Default)]
pub(crate) struct TrimWatch {
    look_ahead: Option<EntryId>,
    anchor: Option<Anchor>,
    /// The largest id reported as removed or as a possible trim.
    reported: EntryId,
    /// Whether the stream is known to be behind the position (reported once
    /// until it passes it again).
    behind: bool,
    /// The reads that returned entries since the last probe (at least the
    /// last one): where the first started and the ids they returned, in
    /// order. The driver probes once these reach a batch, which bounds them.
    previous: Option<(EntryId, Vec<EntryId>)>,
}

impl TrimWatch {
    /// A watch with no memory (after a start or a reconnect).
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Forgets what earlier reads saw (the stream may have been replaced).
    pub(crate) fn forget(&mut self) {
        self.look_ahead = None;
        self.anchor = None;
        self.previous = None;
    }

    /// Entries returned since the last probe, as far as the deletion marker
    /// is concerned.
    pub(crate) fn unprobed(&self) -> usize {
        self.previous.as_ref().map_or(0, |(_, ids)| ids.len())
    }

    /// Judges one read; returns what is to be reported, once per finding.
    pub(crate) fn observe(&mut self, seen: ReadSeen<'_>) -> Option<Finding> {
        let finding = self.judge(&seen);
        if let Some(probe) = seen.probe {
            let received_after =
                |last: EntryId| seen.ids.iter().filter(|id| **id > last).count() as u64;
            self.anchor = match (probe.last_generated_id, probe.entries_added, probe.length) {
                (Some(last), Some(added), Some(length))
                    if length > 0 && probe.max_deleted_entry_id.is_none_or(|d| d < last) =>
                {
                    Some(Anchor {
                        last_generated: last,
                        entries_added: added,
                        received_after: received_after(last),
                    })
                }
                _ => None,
            };
        } else if let Some(anchor) = &mut self.anchor {
            let last = anchor.last_generated;
            anchor.received_after += seen.ids.iter().filter(|id| **id > last).count() as u64;
        }
        self.look_ahead = seen.look_ahead;
        if !seen.ids.is_empty() {
            // Without a probe, this read's range joins the ones the next
            // probe's deletion marker is checked against.
            match &mut self.previous {
                Some((_, ids))
                    if seen.probe.is_none()
                        && ids.last().is_some_and(|last| *last <= seen.read_from) =>
                {
                    ids.extend_from_slice(seen.ids);
                }
                _ => self.previous = Some((seen.read_from, seen.ids.to_vec())),
            }
        }
        finding.filter(|finding| self.first_report(finding))
    }

    fn first_report(&mut self, finding: &Finding) -> bool {
        match *finding {
            Finding::Lost { evidence, .. }
            | Finding::PossiblyTrimmed {
                first: evidence, ..
            } => {
                if evidence <= self.reported {
                    return false;
                }
                self.reported = evidence;
                true
            }
            Finding::BehindPosition { .. } => !std::mem::replace(&mut self.behind, true),
        }
    }

    fn judge(&mut self, seen: &ReadSeen<'_>) -> Option<Finding> {
        let read_from = seen.read_from;
        let first = seen.ids.first().copied().or(seen.look_ahead);
        if let Some(expected) = self.look_ahead.take() {
            if first != Some(expected) && expected > read_from {
                return Some(Finding::Lost {
                    read_from,
                    evidence: expected,
                    count: None,
                });
            }
        }
        let probe = seen.probe?;
        match probe.last_generated_id {
            // (Never below the zero id: a fresh start is never behind.)
            Some(last) if last < read_from => {
                return Some(Finding::BehindPosition {
                    read_from,
                    last_generated: last,
                })
            }
            Some(_) => self.behind = false,
            None => {}
        }
        let last_read = seen.ids.last().copied().or(seen.look_ahead);
        if let Some(deleted) = probe.max_deleted_entry_id {
            let in_this_read = deleted > read_from
                && last_read.is_some_and(|last| deleted <= last)
                && !seen.ids.contains(&deleted)
                && seen.look_ahead != Some(deleted);
            let in_the_previous_read = self.previous.as_ref().is_some_and(|(from, ids)| {
                deleted > *from
                    && ids.last().is_some_and(|last| deleted <= *last)
                    && ids.binary_search(&deleted).is_err()
            });
            if in_this_read || in_the_previous_read {
                return Some(Finding::Lost {
                    read_from,
                    evidence: deleted,
                    count: None,
                });
            }
        }
        let stream_first = probe.first_entry_id?;
        if read_from == EntryId::ZERO || stream_first <= read_from {
            return None;
        }
        if let Some(anchor) = self.anchor {
            if anchor.last_generated > read_from && anchor.last_generated < stream_first {
                return Some(Finding::Lost {
                    read_from,
                    evidence: anchor.last_generated,
                    count: None,
                });
            }
            let no_deletion_after_anchor = probe
                .max_deleted_entry_id
                .is_none_or(|deleted| deleted <= anchor.last_generated);
            if let (true, Some(added), Some(length)) = (
                anchor.last_generated <= read_from && no_deletion_after_anchor,
                probe.entries_added,
                probe.length,
            ) {
                let removed = added
                    .saturating_sub(anchor.entries_added)
                    .saturating_sub(anchor.received_after)
                    .saturating_sub(length);
                if removed > 0 {
                    return Some(Finding::Lost {
                        read_from,
                        evidence: stream_first,
                        count: Some(removed),
                    });
                }
                return None;
            }
        }
        if stream_first.ms == read_from.ms && Some(stream_first.seq) == read_from.seq.checked_add(1)
        {
            return None;
        }
        Some(Finding::PossiblyTrimmed {
            read_from,
            first: stream_first,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(ms: u64) -> EntryId {
        EntryId::new(ms, 0)
    }

    fn probe(first: u64, last: u64, added: u64, length: u64) -> DeletionProbe {
        DeletionProbe {
            first_entry_id: Some(id(first)),
            max_deleted_entry_id: None,
            last_generated_id: Some(id(last)),
            entries_added: Some(added),
            length: Some(length),
        }
    }

    fn read<'a>(
        from: u64,
        ids: &'a [EntryId],
        ahead: Option<u64>,
        probe: Option<DeletionProbe>,
    ) -> ReadSeen<'a> {
        ReadSeen {
            read_from: id(from),
            ids,
            look_ahead: ahead.map(id),
            probe,
        }
    }

    #[test]
    fn a_look_ahead_entry_gone_before_the_next_read_is_a_loss() {
        let mut watch = TrimWatch::new();
        let first = [id(1), id(2)];
        assert_eq!(watch.observe(read(0, &first, Some(3), None)), None);
        let next = [id(7), id(8)];
        assert_eq!(
            watch.observe(read(2, &next, None, None)),
            Some(Finding::Lost {
                read_from: id(2),
                evidence: id(3),
                count: None
            })
        );
    }

    #[test]
    fn the_look_ahead_entry_read_again_is_no_loss() {
        let mut watch = TrimWatch::new();
        assert_eq!(watch.observe(read(0, &[id(1)], Some(3), None)), None);
        assert_eq!(watch.observe(read(1, &[id(3)], None, None)), None);
    }

    #[test]
    fn a_stream_starting_after_the_position_with_nothing_to_prove_a_gap_is_possible_only() {
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(5, &[id(9)], None, Some(probe(9, 9, 9, 1)))),
            Some(Finding::PossiblyTrimmed {
                read_from: id(5),
                first: id(9)
            })
        );
        let mut watch = TrimWatch::new();
        let next_seq = [EntryId::new(5, 1)];
        let mut seen = read(5, &next_seq, None, None);
        seen.probe = Some(DeletionProbe {
            first_entry_id: Some(EntryId::new(5, 1)),
            ..probe(5, 5, 5, 1)
        });
        assert_eq!(watch.observe(seen), None, "the very next id: no gap");
    }

    #[test]
    fn a_trim_exactly_at_the_position_after_catching_up_is_no_loss() {
        let mut watch = TrimWatch::new();
        // Caught up at 5: the probe saw 5 as the last of 5 entries.
        assert_eq!(
            watch.observe(read(4, &[id(5)], None, Some(probe(1, 5, 5, 5)))),
            None
        );
        // Entries 6 and 7 arrive; everything up to 6 is trimmed (MINID 6).
        assert_eq!(
            watch.observe(read(5, &[id(6), id(7)], None, Some(probe(6, 7, 7, 2)))),
            None
        );
    }

    #[test]
    fn a_trim_past_the_position_after_catching_up_is_counted() {
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(4, &[id(5)], None, Some(probe(1, 5, 5, 5)))),
            None
        );
        // 6..=9 arrive; 6 and 7 are trimmed before the read.
        assert_eq!(
            watch.observe(read(5, &[id(8), id(9)], None, Some(probe(8, 9, 9, 2)))),
            Some(Finding::Lost {
                read_from: id(5),
                evidence: id(8),
                count: Some(2)
            })
        );
    }

    #[test]
    fn entries_arriving_between_the_probe_and_its_read_count_as_received() {
        let mut watch = TrimWatch::new();
        // The probe saw 5 entries ending at 5; 6 arrived before the read.
        assert_eq!(
            watch.observe(read(4, &[id(5), id(6)], None, Some(probe(1, 5, 5, 5)))),
            None
        );
        // 7 and 8 arrived, 7 was trimmed: one loss, not two.
        assert_eq!(
            watch.observe(read(6, &[id(8)], None, Some(probe(8, 8, 8, 1)))),
            Some(Finding::Lost {
                read_from: id(6),
                evidence: id(8),
                count: Some(1)
            })
        );
    }

    #[test]
    fn reads_without_a_probe_count_what_they_received_after_the_anchor() {
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(3, &[id(4)], None, Some(probe(1, 5, 5, 5)))),
            None
        );
        // No probe: 5 is the anchor itself, 6 and 7 came after it.
        assert_eq!(
            watch.observe(read(4, &[id(5), id(6), id(7)], None, None)),
            None
        );
        // 8 to 10 arrived, 8 and 9 were trimmed unread.
        assert_eq!(
            watch.observe(read(7, &[id(10)], None, Some(probe(10, 10, 10, 1)))),
            Some(Finding::Lost {
                read_from: id(7),
                evidence: id(10),
                count: Some(2)
            })
        );
    }

    #[test]
    fn what_lies_at_or_behind_the_position_is_no_evidence() {
        // A look-ahead entry the position has reached (handled since) is
        // not expected again.
        let mut watch = TrimWatch::new();
        assert_eq!(watch.observe(read(0, &[id(1)], Some(3), None)), None);
        assert_eq!(watch.observe(read(3, &[id(7)], None, None)), None);
        // An entry deleted behind the position was read already.
        let mut deleted_behind = probe(1, 7, 7, 6);
        deleted_behind.max_deleted_entry_id = Some(id(3));
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(5, &[id(6), id(7)], None, Some(deleted_behind))),
            None
        );
    }

    #[test]
    fn an_earlier_deletion_leaves_the_anchor_and_a_later_one_stops_the_count() {
        // 3 was deleted long ago: the counters still hold.
        let mut old_deletion = probe(1, 5, 5, 4);
        old_deletion.max_deleted_entry_id = Some(id(3));
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(4, &[id(5)], None, Some(old_deletion))),
            None
        );
        let mut later = probe(8, 8, 8, 1);
        later.max_deleted_entry_id = Some(id(3));
        assert_eq!(
            watch.observe(read(5, &[id(8)], None, Some(later))),
            Some(Finding::Lost {
                read_from: id(5),
                evidence: id(8),
                count: Some(2)
            })
        );
        // 7 was deleted after the anchor: the count no longer adds up.
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(4, &[id(5)], None, Some(probe(1, 5, 5, 5)))),
            None
        );
        assert_eq!(watch.observe(read(5, &[id(6), id(7)], None, None)), None);
        let mut deleted_after = probe(9, 9, 9, 1);
        deleted_after.max_deleted_entry_id = Some(id(7));
        assert_eq!(
            watch.observe(read(7, &[id(9)], None, Some(deleted_after))),
            Some(Finding::PossiblyTrimmed {
                read_from: id(7),
                first: id(9)
            })
        );
    }

    #[test]
    fn an_anchor_still_first_in_the_stream_or_ahead_of_the_position_counts_nothing() {
        // The backlog ends at 10; the stream now starts at 10: not gone.
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(0, &[id(1), id(2)], None, Some(probe(1, 10, 10, 10)))),
            None
        );
        assert_eq!(
            watch.observe(read(2, &[id(10)], None, Some(probe(10, 12, 12, 3)))),
            Some(Finding::PossiblyTrimmed {
                read_from: id(2),
                first: id(10)
            })
        );
        // Still behind the anchor: the counters cannot tell yet.
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(0, &[id(1), id(2)], None, Some(probe(1, 10, 10, 10)))),
            None
        );
        assert_eq!(
            watch.observe(read(2, &[id(5)], None, Some(probe(5, 12, 12, 8)))),
            Some(Finding::PossiblyTrimmed {
                read_from: id(2),
                first: id(5)
            })
        );
    }

    #[test]
    fn only_the_very_next_id_proves_there_was_no_gap() {
        for first in [EntryId::new(5, 3), EntryId::new(9, 1)] {
            let mut watch = TrimWatch::new();
            let ids = [first];
            let mut seen = read(5, &ids, None, None);
            seen.probe = Some(DeletionProbe {
                first_entry_id: Some(first),
                max_deleted_entry_id: None,
                last_generated_id: Some(first),
                entries_added: None,
                length: Some(1),
            });
            assert_eq!(
                watch.observe(seen),
                Some(Finding::PossiblyTrimmed {
                    read_from: id(5),
                    first
                }),
                "{first}"
            );
        }
    }

    #[test]
    fn a_deletion_exactly_at_the_position_is_no_loss() {
        let mut at_position = probe(1, 7, 7, 6);
        at_position.max_deleted_entry_id = Some(id(5));
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(5, &[id(6), id(7)], None, Some(at_position))),
            None
        );
        // Nor at the start of the reads since the last probe.
        let mut watch = TrimWatch::new();
        assert_eq!(watch.observe(read(5, &[id(6), id(7)], None, None)), None);
        let mut later = probe(1, 8, 8, 7);
        later.max_deleted_entry_id = Some(id(5));
        assert_eq!(watch.observe(read(7, &[id(8)], None, Some(later))), None);
    }

    #[test]
    fn a_probe_whose_last_entry_was_deleted_anchors_nothing() {
        // The stream's last entry (5) was deleted by XDEL: its counters no
        // longer say which entries are still to come.
        let mut last_deleted = probe(1, 5, 5, 4);
        last_deleted.max_deleted_entry_id = Some(id(5));
        let mut watch = TrimWatch::new();
        assert_eq!(watch.observe(read(5, &[], None, Some(last_deleted))), None);
        let mut later = probe(8, 8, 8, 1);
        later.max_deleted_entry_id = Some(id(5));
        // Only a possible trim, not a counted loss.
        assert_eq!(
            watch.observe(read(5, &[id(8)], None, Some(later))),
            Some(Finding::PossiblyTrimmed {
                read_from: id(5),
                first: id(8)
            })
        );
        // Nor does an empty stream.
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(5, &[], None, Some(probe(1, 5, 5, 0)))),
            None
        );
        assert_eq!(
            watch.observe(read(5, &[id(8)], None, Some(probe(8, 8, 8, 1)))),
            Some(Finding::PossiblyTrimmed {
                read_from: id(5),
                first: id(8)
            })
        );
    }

    #[test]
    fn an_anchor_entry_gone_past_the_position_is_a_loss() {
        let mut watch = TrimWatch::new();
        // A backlog: the stream ends at 100 while we read 1..=2.
        assert_eq!(
            watch.observe(read(
                0,
                &[id(1), id(2)],
                None,
                Some(probe(1, 100, 100, 100))
            )),
            None
        );
        assert_eq!(
            watch.observe(read(2, &[id(150)], None, Some(probe(150, 160, 160, 11)))),
            Some(Finding::Lost {
                read_from: id(2),
                evidence: id(100),
                count: None
            })
        );
    }

    #[test]
    fn an_entry_deleted_unread_within_the_read_range_is_a_loss_and_reported_once() {
        let mut watch = TrimWatch::new();
        let mut marked = probe(1, 9, 9, 8);
        marked.max_deleted_entry_id = Some(id(4));
        let ids = [id(3), id(5)];
        let finding = Some(Finding::Lost {
            read_from: id(2),
            evidence: id(4),
            count: None,
        });
        assert_eq!(watch.observe(read(2, &ids, None, Some(marked))), finding);
        assert_eq!(watch.observe(read(2, &ids, None, Some(marked))), None);
    }

    #[test]
    fn a_deletion_in_any_read_since_the_last_probe_is_seen_by_the_next() {
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(0, &[id(1)], None, Some(probe(1, 1, 1, 1)))),
            None
        );
        // Reads without a probe: 3 was deleted before the second was served.
        assert_eq!(watch.observe(read(1, &[id(2)], None, None)), None);
        assert_eq!(watch.observe(read(2, &[id(4)], None, None)), None);
        assert_eq!(watch.observe(read(4, &[id(5)], None, None)), None);
        assert_eq!(watch.unprobed(), 4);
        let mut marked = probe(1, 5, 5, 4);
        marked.max_deleted_entry_id = Some(id(3));
        assert_eq!(
            watch.observe(read(5, &[id(6)], None, Some(marked))),
            Some(Finding::Lost {
                read_from: id(5),
                evidence: id(3),
                count: None
            })
        );
        assert_eq!(watch.unprobed(), 1, "the probe started a new record");
        // A deletion of an entry read before is none of our business.
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(0, &[id(1)], None, Some(probe(1, 1, 1, 1)))),
            None
        );
        assert_eq!(watch.observe(read(1, &[id(2)], None, None)), None);
        assert_eq!(watch.observe(read(2, &[id(3)], None, None)), None);
        marked.max_deleted_entry_id = Some(id(2));
        assert_eq!(watch.observe(read(3, &[], None, Some(marked))), None);
        // A rewind starts the record over.
        watch.forget();
        assert_eq!(watch.unprobed(), 0);
    }

    #[test]
    fn an_entry_deleted_while_a_read_waited_is_seen_by_the_next_probe() {
        let mut watch = TrimWatch::new();
        // A blocking read returned 1 and 3; 2 was deleted meanwhile.
        assert_eq!(watch.observe(read(0, &[id(1), id(3)], None, None)), None);
        let mut marked = probe(1, 3, 3, 2);
        marked.max_deleted_entry_id = Some(id(2));
        assert_eq!(
            watch.observe(read(3, &[], None, Some(marked))),
            Some(Finding::Lost {
                read_from: id(3),
                evidence: id(2),
                count: None
            })
        );
        let mut watch = TrimWatch::new();
        assert_eq!(watch.observe(read(0, &[id(1), id(2)], None, None)), None);
        marked.max_deleted_entry_id = Some(id(2));
        assert_eq!(
            watch.observe(read(2, &[], None, Some(marked))),
            None,
            "2 was read before"
        );
    }

    #[test]
    fn a_stream_behind_the_position_is_reported_once_per_episode() {
        let mut watch = TrimWatch::new();
        let behind = Some(Finding::BehindPosition {
            read_from: id(50),
            last_generated: id(3),
        });
        assert_eq!(
            watch.observe(read(50, &[], None, Some(probe(1, 3, 3, 3)))),
            behind
        );
        assert_eq!(
            watch.observe(read(50, &[], None, Some(probe(1, 4, 4, 4)))),
            None
        );
        assert_eq!(
            watch.observe(read(50, &[id(51)], None, Some(probe(1, 51, 51, 5)))),
            None
        );
        assert!(watch
            .observe(read(51, &[], None, Some(probe(1, 3, 1, 1))))
            .is_some());
    }

    #[test]
    fn trimming_behind_the_position_is_no_loss() {
        let mut watch = TrimWatch::new();
        assert_eq!(
            watch.observe(read(6, &[id(7)], None, Some(probe(5, 10, 10, 6)))),
            None
        );
    }
}
