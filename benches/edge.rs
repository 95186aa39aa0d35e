fn main() { eprintln!("edge benchmark: being written (issue 2 §13)"); }
