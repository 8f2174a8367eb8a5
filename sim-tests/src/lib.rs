//! Test harnesses shared by the differential tests, the seeded simulation and the checkers.
