//! The `skiff` binary: parses the command line and hands over to `skiff::cli`.

fn main() {
    std::process::exit(skiff::cli::main());
}
