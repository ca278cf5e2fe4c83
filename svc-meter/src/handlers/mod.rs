//! One module per consumed subject: decode → handle → (publish). Dispatched by `app`.

pub mod deployed;
