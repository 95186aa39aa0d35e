//! `fediedge doctor` tests (issue 4).
