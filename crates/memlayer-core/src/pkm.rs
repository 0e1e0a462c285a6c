//! Product-key memory layer oracle (DESIGN §1).
