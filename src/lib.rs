//! Ration
