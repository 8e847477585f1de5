fn main() {
    let cli = connwatch::cli::parse();
    match connwatch::cli::main(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("connwatch: error: {e:#}");
            std::process::exit(1);
        }
    }
}
