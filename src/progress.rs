//! Progress bars (indicatif) with rate and ETA; hidden when stderr is not a terminal.
