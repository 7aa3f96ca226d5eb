//! A WASI command, not a `shop:service` component: the host must refuse it
//! as a component with the wrong world.

fn main() {
    println!("I am not a service");
}
