//! Tuning procedures of DESIGN 1.2 that do not need the LM.
