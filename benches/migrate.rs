fn main() { eprintln!("migrate benchmark: being written (issue 3 §8)"); }
