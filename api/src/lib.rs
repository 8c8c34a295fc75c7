//! mycel's custom resources (group `mycel.dev`).
