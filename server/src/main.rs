//! `cim-server`: runs one connection server. See `cim-server --help`.

fn main() {}
